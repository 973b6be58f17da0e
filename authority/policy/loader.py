"""Loading, testing and swapping policy sets. File I/O happens here, at the edge; decisions never
read a file.

- :func:`load_policy_set` reads policy files and compiles them (the backend follows the extension,
  ``.cedar`` or ``.rego``); a broken policy raises :class:`InvalidArgument` ``POLICY_INVALID`` with
  the compiler's message.
- Policy tests live in ``<stem>.tests.json`` next to a policy (``agents.cedar`` and ``agents.rego``
  share ``agents.tests.json``)::

      {"cases": [{"name": "reader reads metrics",
                  "input": {"principal": "spiffe://example.org/agent/r", "action": "read",
                            "resource": "metrics/prod", "time": "2026-01-05T10:00:00+00:00",
                            "requested": {"purpose": "report"}},
                  "expect": {"outcome": "allow", "ttl_cap_seconds": 300,
                             "max_delegation_depth": 1, "reasons": ["agents-read-metrics"]}}]}

  ``input`` takes the :class:`PolicyInput` fields (``time`` in ISO 8601 with an offset; omitted
  optional fields default to empty / 0 / false): the authority's facts at the top level, what the
  caller says under ``requested`` (``purpose``, ``environment``, ``parameters``). The resource's
  kind and environment are derived from its name, never given. In ``expect``, ``outcome`` is
  required; the other keys are checked only when present (``"ttl_cap_seconds": null`` expects no
  cap; ``reasons`` is compared as a set).
- :class:`PolicyManager` holds the running engine and replaces it only with one that compiled and
  passed its tests.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from authority.clock import Clock
from authority.errors import InvalidArgument
from authority.policy._host import POLICY_INVALID, PolicySource, source_version
from authority.policy.model import (
    Decision,
    ExplainingPolicyEngine,
    Outcome,
    PolicyEngine,
    PolicyInput,
)

POLICY_TESTS_FAILED = "POLICY_TESTS_FAILED"
POLICY_TESTS_INVALID = "POLICY_TESTS_INVALID"
POLICY_UNTESTED = "POLICY_UNTESTED"
BACKENDS: Mapping[str, str] = {"cedar": ".cedar", "rego": ".rego"}
TESTS_SUFFIX = ".tests.json"
MAX_POLICY_FILE_BYTES = 1 << 20
MAX_TESTS_FILE_BYTES = 4 << 20
DEFAULT_POLICY_NAME = "default"


def _read_text(path: Path, limit: int, reason: str) -> str:
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidArgument(f"{path}: larger than {limit} bytes", reason=reason)
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc}", reason=reason) from exc


def _backend_for(files: Sequence[Path], backend: str | None) -> str:
    if not files:
        raise InvalidArgument("no policy files given", reason=POLICY_INVALID)
    if backend is not None and backend not in BACKENDS:
        raise InvalidArgument(
            f"unknown policy backend {backend!r} (known: {', '.join(BACKENDS)})",
            reason=POLICY_INVALID,
        )
    by_extension = {suffix: name for name, suffix in BACKENDS.items()}
    found = set()
    for path in files:
        name = by_extension.get(path.suffix)
        if name is None:
            raise InvalidArgument(
                f"{path}: a policy file ends in .cedar or .rego", reason=POLICY_INVALID
            )
        found.add(name)
    if len(found) > 1:
        raise InvalidArgument("one policy set cannot mix Cedar and Rego", reason=POLICY_INVALID)
    (chosen,) = found
    if backend is not None and backend != chosen:
        raise InvalidArgument(
            f"backend {backend!r} was asked for but the files are {chosen}", reason=POLICY_INVALID
        )
    return chosen


def compile_policy_set(
    sources: Sequence[PolicySource], backend: str, *, policy_id: str
) -> PolicyEngine:
    """Compile policy texts (no I/O). Raises InvalidArgument ``POLICY_INVALID`` when broken, and
    FailedPrecondition ``POLICY_BACKEND_UNAVAILABLE`` for Rego without regorus installed."""
    if not sources:
        raise InvalidArgument("no policy sources given", reason=POLICY_INVALID)
    if backend == "cedar":
        from authority.policy.cedar import CedarEngine

        return CedarEngine(sources, policy_id=policy_id)
    if backend == "rego":
        from authority.policy.rego import RegoEngine

        return RegoEngine(sources, policy_id=policy_id)
    raise InvalidArgument(f"unknown policy backend {backend!r}", reason=POLICY_INVALID)


def load_policy_set(
    files: Sequence[Path], backend: str | None = None, *, name: str | None = None
) -> PolicyEngine:
    """Read and compile policy files. The policy id is ``name``, else the files' stems joined
    with ``+``; the version is a digest of the texts."""
    paths = [Path(f) for f in files]
    chosen = _backend_for(paths, backend)
    sources = [
        PolicySource(p.name, _read_text(p, MAX_POLICY_FILE_BYTES, POLICY_INVALID)) for p in paths
    ]
    policy_id = name or "+".join(p.stem for p in paths)
    return compile_policy_set(sources, chosen, policy_id=policy_id)


def default_policy_text() -> str:
    return (
        importlib.resources.files("authority.policy")
        .joinpath("default.cedar")
        .read_text(encoding="utf-8")
    )


def load_default_policy() -> PolicyEngine:
    """The shipped policy: Cedar, default deny (it permits nothing)."""
    source = PolicySource("default.cedar", default_policy_text())
    return compile_policy_set([source], "cedar", policy_id=DEFAULT_POLICY_NAME)


def files_version(files: Sequence[Path]) -> str:
    """The version the files on disk would load as (compare with a running engine's)."""
    return source_version(
        [_read_text(Path(p), MAX_POLICY_FILE_BYTES, POLICY_INVALID) for p in files]
    )


# -- policy tests ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyTestCase:
    name: str
    input: PolicyInput
    outcome: Outcome
    check_ttl: bool
    ttl_cap_seconds: int | None
    max_delegation_depth: int | None
    reasons: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class TestResult:
    """One case of one tests file, run against one engine."""

    __test__: ClassVar[bool] = False  # not a pytest class

    file: str
    name: str
    passed: bool
    failures: tuple[str, ...]
    decision: Decision | None


def tests_file_for(policy_file: Path) -> Path:
    return policy_file.with_name(policy_file.stem + TESTS_SUFFIX)


def find_policy_tests(files: Sequence[Path]) -> list[Path]:
    """The ``<stem>.tests.json`` files that exist next to the policy files, each once."""
    found: list[Path] = []
    for policy_file in files:
        candidate = tests_file_for(Path(policy_file))
        if candidate.is_file() and candidate not in found:
            found.append(candidate)
    return found


def _tests_invalid(source: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{source}: {message}", reason=POLICY_TESTS_INVALID)


def _optional_int(expect: Mapping[str, object], key: str, source: str, name: str) -> int | None:
    value = expect.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _tests_invalid(source, f"case {name!r}: expect.{key} must be an integer >= 0")
    return value


def parse_policy_tests(text: str, source: str) -> list[PolicyTestCase]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _tests_invalid(source, f"not JSON: {exc}") from exc
    cases = document.get("cases") if isinstance(document, dict) else None
    if not isinstance(cases, list):
        raise _tests_invalid(source, 'expected {"cases": [...]}')
    parsed: list[PolicyTestCase] = []
    seen: set[str] = set()
    for index, case in enumerate(cases):
        if not isinstance(case, dict):
            raise _tests_invalid(source, f"case #{index} is not an object")
        name = case.get("name")
        if not isinstance(name, str) or not name:
            raise _tests_invalid(source, f"case #{index} has no name")
        if name in seen:
            raise _tests_invalid(source, f"case name {name!r} is used twice")
        seen.add(name)
        unknown = sorted(set(case) - {"name", "input", "expect", "comment"})
        if unknown:
            raise _tests_invalid(source, f"case {name!r}: unknown key(s) {', '.join(unknown)}")
        expect = case.get("expect")
        if not isinstance(expect, dict):
            raise _tests_invalid(source, f"case {name!r}: expect must be an object")
        unknown = sorted(
            set(expect) - {"outcome", "ttl_cap_seconds", "max_delegation_depth", "reasons"}
        )
        if unknown:
            raise _tests_invalid(source, f"case {name!r}: unknown expect key(s) {unknown}")
        try:
            outcome = Outcome(str(expect.get("outcome")))
            inp = PolicyInput.from_json(case.get("input"))
        except (ValueError, InvalidArgument) as exc:
            raise _tests_invalid(source, f"case {name!r}: {exc}") from exc
        reasons = expect.get("reasons")
        if reasons is not None and (
            not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons)
        ):
            raise _tests_invalid(source, f"case {name!r}: expect.reasons must list strings")
        parsed.append(
            PolicyTestCase(
                name=name,
                input=inp,
                outcome=outcome,
                check_ttl="ttl_cap_seconds" in expect,
                ttl_cap_seconds=_optional_int(expect, "ttl_cap_seconds", source, name),
                max_delegation_depth=_optional_int(expect, "max_delegation_depth", source, name),
                reasons=None if reasons is None else frozenset(reasons),
            )
        )
    return parsed


def load_policy_tests(path: Path) -> list[PolicyTestCase]:
    return parse_policy_tests(
        _read_text(path, MAX_TESTS_FILE_BYTES, POLICY_TESTS_INVALID), str(path)
    )


def check_case(engine: PolicyEngine, case: PolicyTestCase, file: str = "") -> TestResult:
    decision = engine.decide(case.input)
    failures: list[str] = []
    if decision.outcome is not case.outcome:
        failures.append(
            f"outcome {decision.outcome} != expected {case.outcome} "
            f"(reasons: {', '.join(decision.reasons) or '-'})"
        )
    ttl = None if decision.ttl_cap is None else int(decision.ttl_cap.total_seconds())
    if case.check_ttl and ttl != case.ttl_cap_seconds:
        failures.append(f"ttl_cap_seconds {ttl} != expected {case.ttl_cap_seconds}")
    depth = case.max_delegation_depth
    if depth is not None and decision.max_delegation_depth != depth:
        failures.append(f"max_delegation_depth {decision.max_delegation_depth} != expected {depth}")
    if case.reasons is not None and frozenset(decision.reasons) != case.reasons:
        failures.append(f"reasons {sorted(decision.reasons)} != expected {sorted(case.reasons)}")
    return TestResult(file, case.name, not failures, tuple(failures), decision)


def run_policy_tests(engine: PolicyEngine, test_files: Sequence[Path]) -> list[TestResult]:
    """Every case of every file, in order; a malformed tests file raises POLICY_TESTS_INVALID."""
    results: list[TestResult] = []
    for path in test_files:
        for case in load_policy_tests(Path(path)):
            results.append(check_case(engine, case, str(path)))
    return results


def failed_names(results: Sequence[TestResult]) -> list[str]:
    return [f"{r.file}: {r.name}" if r.file else r.name for r in results if not r.passed]


# -- the running policy ---------------------------------------------------------------------------


class PolicyManager:
    """The running engine, replaced only by a policy set that compiles and passes its own tests.

    Readers take ``current`` (one attribute read, no lock); reloads are serialised.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        clock: Clock,
        files: Sequence[Path] = (),
        backend: str | None = None,
        results: Sequence[TestResult] = (),
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state: tuple[PolicyEngine, dt.datetime, tuple[Path, ...], str | None] = (
            engine,
            clock.now(),
            tuple(Path(f) for f in files),
            backend,
        )
        # The policy's own test cases as they ran when it was loaded (all passed, or it would
        # not be running); set with the engine.
        self._results: tuple[TestResult, ...] = tuple(results)

    @classmethod
    def with_default_policy(cls, *, clock: Clock) -> PolicyManager:
        return cls(load_default_policy(), clock=clock)

    @classmethod
    def from_files(
        cls,
        files: Sequence[Path],
        *,
        clock: Clock,
        backend: str | None = None,
        name: str | None = None,
        test_files: Sequence[Path] | None = None,
    ) -> PolicyManager:
        """Start from files: compile them and run their tests, or raise."""
        engine, results = _prepare(files, backend, name, test_files)
        return cls(engine, clock=clock, files=files, backend=backend, results=results)

    @property
    def current(self) -> PolicyEngine:
        return self._state[0]

    @property
    def policy_id(self) -> str:
        return self._state[0].policy_id

    @property
    def policy_version(self) -> str:
        return self._state[0].policy_version

    @property
    def backend(self) -> str:
        return self._state[0].backend

    @property
    def loaded_at(self) -> dt.datetime:
        return self._state[1]

    @property
    def files(self) -> tuple[Path, ...]:
        return self._state[2]

    @property
    def test_results(self) -> tuple[TestResult, ...]:
        """The running policy's own test cases, as they ran when it was loaded."""
        return self._results

    def decide(self, inp: PolicyInput) -> Decision:
        return self._state[0].decide(inp)

    def reload(
        self,
        files: Sequence[Path] | None = None,
        *,
        backend: str | None = None,
        name: str | None = None,
        test_files: Sequence[Path] | None = None,
        require_tests: bool = False,
    ) -> PolicyEngine:
        """Compile ``files`` (default: the files loaded last), run the tests found next to them
        (or ``test_files``), and swap the running engine only when all of that succeeds.

        Raises InvalidArgument ``POLICY_INVALID`` / ``POLICY_TESTS_INVALID`` /
        ``POLICY_TESTS_FAILED`` (naming the failing cases), and ``POLICY_UNTESTED`` when
        ``require_tests`` and no test case ran; the running engine is then unchanged.
        """
        with self._lock:
            _engine, _at, current_files, current_backend = self._state
            chosen = tuple(Path(f) for f in files) if files is not None else current_files
            if not chosen:
                raise InvalidArgument("no policy files to reload", reason=POLICY_INVALID)
            backend = backend if backend is not None else current_backend
            engine, results = _prepare(chosen, backend, name, test_files)
            if require_tests and not results:
                raise InvalidArgument(
                    "the policy has no tests: add test cases in "
                    f"{tests_file_for(chosen[0]).name} beside it (see `authority policy test`), "
                    "or allow an untested policy (authority policy load --allow-untested)",
                    reason=POLICY_UNTESTED,
                )
            self._state = (engine, self._clock.now(), chosen, backend)
            self._results = tuple(results)
            return engine

    def changed_on_disk(self) -> bool:
        """True when the loaded files now hold other text (a cue to ``reload``)."""
        files = self.files
        return bool(files) and files_version(files) != self.policy_version


def _prepare(
    files: Sequence[Path],
    backend: str | None,
    name: str | None,
    test_files: Sequence[Path] | None,
) -> tuple[PolicyEngine, list[TestResult]]:
    engine = load_policy_set(files, backend, name=name)
    tests = find_policy_tests(files) if test_files is None else list(test_files)
    results = run_policy_tests(engine, tests)
    failed = failed_names(results)
    if failed:
        raise InvalidArgument(
            f"policy tests failed ({len(failed)}): {'; '.join(failed)}",
            reason=POLICY_TESTS_FAILED,
        )
    return engine, results


def explain(engine: PolicyEngine, inp: PolicyInput) -> dict[str, object]:
    """The decision, which policies matched (``matched``: Cedar's determining policies, or the
    names a Rego decision gives as its reasons), and the context the engine evaluated (Cedar:
    ``request`` and ``entities``, plus ``errors``; Rego: ``rego_input`` and ``rego_decision``)."""
    if isinstance(engine, ExplainingPolicyEngine):
        return engine.explain(inp)
    return {"decision": engine.decide(inp).to_json(), "input": inp.to_json()}
