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
  // An element with data-live="URL" and an id is replaced by the element of the same id in
  // what URL answers now (server-rendered, escaped HTML parsed as a document: nothing runs).
  async function refresh(el) {
    try {
      var response = await fetch(el.dataset.live, { credentials: "same-origin" });
      if (!response.ok) { return; }
      var doc = new DOMParser().parseFromString(await response.text(), "text/html");
      var fresh = doc.getElementById(el.id);
      var current = document.getElementById(el.id);
      if (fresh && current) { current.replaceWith(fresh); }
    } catch (e) { /* the next poll tries again */ }
  }
  setInterval(function () {
    document.querySelectorAll("[data-live][id]").forEach(refresh);
  }, 2000);
})();
