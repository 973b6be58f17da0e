// The console's only script: live approvals list and countdowns. No inline script anywhere
// (the Content-Security-Policy allows script from this origin's files only).
"use strict";
(function () {
  function tick() {
    document.querySelectorAll(".countdown").forEach(function (el) {
      var s = parseInt(el.dataset.seconds, 10) - 1;
      el.dataset.seconds = String(s);
      if (s <= 0) { el.textContent = "expired"; return; }
      var m = Math.floor(s / 60), r = s % 60;
      el.textContent = m + "m " + (r < 10 ? "0" : "") + r + "s";
    });
  }
  setInterval(tick, 1000);
  var live = document.querySelector("[data-live]");
  if (!live) { return; }
  async function refresh() {
    try {
      var response = await fetch(live.dataset.live, { credentials: "same-origin" });
      if (!response.ok) { return; }
      var doc = new DOMParser().parseFromString(await response.text(), "text/html");
      var fresh = doc.getElementById("approvals-list");
      var current = document.getElementById("approvals-list");
      if (fresh && current) { current.replaceWith(fresh); }
    } catch (e) { /* the next poll tries again */ }
  }
  setInterval(refresh, 2000);
})();
