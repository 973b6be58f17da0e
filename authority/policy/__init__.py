"""Policy-as-code for Exchange: one small interface, two in-process backends, no I/O per decision.

``PolicyEngine.decide(PolicyInput) -> Decision`` answers allow / deny / require-approval with the
granted scope (exactly the requested action), a TTL cap, the further delegations allowed, the
reasons, and the policy id and version. Undefined or an error means deny; ``decide`` never raises.
Facts come from the authority; what the caller only says is kept apart, under ``requested``.

Backends: Cedar (default, :mod:`authority.policy.cedar`, annotations resolved by the host) and Rego
(optional extra, :mod:`authority.policy.rego`). Loading, policy tests and safe reloads live in
:mod:`authority.policy.loader`.
"""

from __future__ import annotations

from authority.policy._host import POLICY_INVALID, PolicySource
from authority.policy.loader import (
    POLICY_TESTS_FAILED,
    POLICY_TESTS_INVALID,
    PolicyManager,
    TestResult,
    compile_policy_set,
    explain,
    load_default_policy,
    load_policy_set,
    run_policy_tests,
)
from authority.policy.model import (
    DEFAULT_DENY_REASON,
    Decision,
    ExplainingPolicyEngine,
    Outcome,
    PolicyEngine,
    PolicyInput,
    Requested,
    resource_environment,
    resource_kind,
)

__all__ = [
    "DEFAULT_DENY_REASON",
    "POLICY_INVALID",
    "POLICY_TESTS_FAILED",
    "POLICY_TESTS_INVALID",
    "Decision",
    "ExplainingPolicyEngine",
    "Outcome",
    "PolicyEngine",
    "PolicyInput",
    "PolicyManager",
    "PolicySource",
    "Requested",
    "TestResult",
    "compile_policy_set",
    "explain",
    "load_default_policy",
    "load_policy_set",
    "resource_environment",
    "resource_kind",
    "run_policy_tests",
]
