"""The running policy, as operators manage it: loaded at start, replaced on command or on a file
change only when the new files compile and their own tests pass, persisted in the data directory
so that a restart runs the same policy, and every load (or refusal) recorded in the audit chain."""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from authority.audit import AuditEvent, digest
from authority.clock import Clock
from authority.errors import AuthorityError, InvalidArgument
from authority.policy import PolicyEngine, PolicyInput, PolicyManager, explain
from authority.store import Store

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.(cedar|rego|tests\.json)$")
MAX_POLICY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PolicyState:
    policy_id: str
    version: str
    backend: str
    loaded_at_epoch: int
    files: tuple[str, ...]  # the policy files and the tests files beside them
    tests_passed: int  # of the policy's own test cases, when it was loaded
    tests_total: int  # 0: loaded untested (the built-in default, or allowed untested)


class PolicyAdmin:
    def __init__(self, manager: PolicyManager, *, folder: Path, store: Store, clock: Clock) -> None:
        self._manager = manager
        self._folder = folder
        self._store = store
        self._clock = clock
        # The changed files last refused (their digests) and why: not tried, logged or recorded
        # again until they change once more.
        self._refused: tuple[dict[str, str], str, str] | None = None  # digests, message, reason

    @classmethod
    def start(
        cls, *, configured: Sequence[Path], folder: Path, store: Store, clock: Clock
    ) -> PolicyAdmin:
        """Configured files win; else what an operator loaded last; else default deny."""
        stored = (
            sorted(p for p in folder.glob("*") if _NAME.fullmatch(p.name))
            if folder.is_dir()
            else []
        )
        if configured:
            manager = PolicyManager.from_files(list(configured), clock=clock)
        elif any(not p.name.endswith(".tests.json") for p in stored):
            manager = PolicyManager.from_files(
                [p for p in stored if not p.name.endswith(".tests.json")], clock=clock
            )
        else:
            manager = PolicyManager.with_default_policy(clock=clock)
        log.info(
            "policy running: id=%s version=%s backend=%s",
            manager.policy_id,
            manager.policy_version,
            manager.backend,
        )
        return cls(manager, folder=folder, store=store, clock=clock)

    @property
    def current(self) -> PolicyEngine:
        return self._manager.current

    def state(self) -> PolicyState:
        """The running policy, with the test cases that ran when it was loaded (not the tests
        files as they are on disk now)."""
        m = self._manager
        results = m.test_results
        test_names = tuple(dict.fromkeys(Path(r.file).name for r in results))
        return PolicyState(
            m.policy_id,
            m.policy_version,
            m.backend,
            int(m.loaded_at.timestamp()),
            (*(p.name for p in m.files), *test_names),
            sum(r.passed for r in results),
            len(results),
        )

    async def load(self, files: Mapping[str, str], *, allow_untested: bool = False) -> PolicyState:
        """Compile, test, then swap and persist; on any failure the running policy stays.

        A policy without test cases is refused (POLICY_UNTESTED) unless ``allow_untested``,
        as ``authority policy test`` fails one; allowed, the audit says it was loaded untested."""
        if not any(not n.endswith(".tests.json") for n in files):
            raise InvalidArgument("give at least one .cedar or .rego file", reason="POLICY_INVALID")
        for name, content in files.items():
            if not _NAME.fullmatch(name):
                raise InvalidArgument(f"policy file name {name!r} is not allowed")
            if len(content.encode()) > MAX_POLICY_BYTES:
                raise InvalidArgument(f"{name} is larger than {MAX_POLICY_BYTES} bytes")
        self._folder.parent.mkdir(parents=True, exist_ok=True)
        staging = self._folder.with_name(f".{self._folder.name}-{uuid.uuid4().hex}")
        staging.mkdir(mode=0o700)
        try:
            for name, content in files.items():
                (staging / name).write_text(content)
            sources = [staging / n for n in sorted(files) if not n.endswith(".tests.json")]
            try:
                # Compiles and runs the tests next to them.
                self._manager.reload(sources, require_tests=not allow_untested)
            except AuthorityError as exc:
                await self._record(
                    "policy.load_refused",
                    files,
                    {"reason": exc.reason, "message": exc.message[:500]},
                )
                raise
            old = self._folder.with_name(f".{self._folder.name}-old-{uuid.uuid4().hex}")
            if self._folder.exists():
                self._folder.rename(old)
            staging.rename(self._folder)
            shutil.rmtree(old, ignore_errors=True)
            final = [self._folder / p.name for p in sources]
            self._manager.reload(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        state = self.state()
        await self._record(
            "policy.loaded",
            files,
            {
                "policy_id": state.policy_id,
                "version": state.version,
                "backend": state.backend,
                "tests": state.tests_total,
                **({"untested": True} if not state.tests_total else {}),
            },
        )
        log.info(
            "policy loaded: id=%s version=%s tests=%d",
            state.policy_id,
            state.version,
            state.tests_total,
        )
        return state

    async def reload_if_changed(self) -> bool:
        """Reload configured files that changed on disk (only if they compile and pass).

        Raises when they cannot be read, or are refused (the old policy keeps running; the
        refusal recorded in the audit once per version of the files): the caller's scheduler
        reports the job failing until the files are fixed or put back."""
        if not self._manager.files or not self._manager.changed_on_disk():
            self._refused = None
            return False
        files = {p.name: p.read_text() for p in self._manager.files if p.exists()}
        digests = {n: digest(c) for n, c in files.items()}
        if self._refused is not None and self._refused[0] == digests:
            raise InvalidArgument(self._refused[1], reason=self._refused[2])
        try:
            self._manager.reload()
        except AuthorityError as exc:
            await self._record(
                "policy.load_refused", files, {"reason": exc.reason, "message": exc.message[:500]}
            )
            message = f"changed policy files refused, the old policy keeps running: {exc.message}"
            self._refused = (digests, message, exc.reason)
            raise InvalidArgument(message, reason=exc.reason) from None
        self._refused = None
        state = self.state()
        await self._record(
            "policy.loaded",
            files,
            {
                "policy_id": state.policy_id,
                "version": state.version,
                "backend": state.backend,
                "tests": state.tests_total,
                "trigger": "file change",
            },
        )
        return True

    def explain(self, input_json: str) -> str:
        try:
            inp = PolicyInput.from_json(json.loads(input_json))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"not a policy input: {exc}") from None
        return json.dumps(explain(self._manager.current, inp), default=str, sort_keys=True)

    async def _record(
        self, kind: str, files: Mapping[str, str], details: dict[str, object]
    ) -> None:
        await self._store.append_audit(
            [
                AuditEvent(
                    kind,
                    self._clock.now(),
                    actor="operator",
                    subject=self._manager.policy_id,
                    details={**details, "files": {n: digest(c) for n, c in sorted(files.items())}},
                )
            ]
        )
