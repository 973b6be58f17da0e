# An example policy for AI agents (Rego backend): the same decisions as agents.cedar.
#
# Agents are workloads of the trust domain example.org whose SPIFFE ID path is under /agent/.
# Edit the trust domain to yours. agents.tests.json holds the tests both policies must pass.
#
# Facts come from the authority: input.principal*, input.resource_kind and
# input.resource_environment (the first and second segments of the resource name), time, risk,
# delegation_depth, approved, attributes. input.requested.{purpose, environment, parameters} is
# what the caller says, checked against nothing: never grant on it alone.
#
# The host reads data.authority.decision:
#   {"allow", "require_approval", "ttl_seconds" (optional), "delegation" (optional), "reasons"}
# This file builds it the way the Cedar backend resolves annotations: any forbid denies; no permit
# denies; approval is required only when every matching permit requires it; the TTL cap and the
# delegation depth are the smallest among the matching permits.
package authority

is_agent if {
	input.principal_trust_domain == "example.org"
	startswith(input.principal_path, "/agent/")
}

# ---- what agents may do ----

# Read any metrics, and hand a read token on once (delegation depth 1).
permits contains {"id": "agents-read-metrics", "ttl": 300, "delegation": 1, "approval": false} if {
	is_agent
	input.action == "read"
	input.resource_kind == "metrics"
}

# Open a change ticket.
permits contains {"id": "agents-open-ticket", "ttl": 120, "approval": false} if {
	is_agent
	input.action == "open_ticket"
	input.resource_kind == "tickets"
}

# Deploy to the sandbox (deploy/sandbox, deploy/sandbox/web, ...): the environment derived from
# the resource name, never one the caller names.
permits contains {"id": "agents-deploy-sandbox", "ttl": 120, "approval": false} if {
	is_agent
	input.action == "deploy"
	input.resource_kind == "deploy"
	input.resource_environment == "sandbox"
}

# Deploy to production, only once an operator approved this very intent.
permits contains {"id": "agents-deploy-production", "ttl": 60, "approval": true} if {
	is_agent
	input.action == "deploy"
	input.resource == "deploy/production"
}

# ---- what nobody may do, whatever else permits it ----

# Metrics are read-only.
forbids contains "metrics-read-only" if {
	input.action == "write"
	input.resource_kind == "metrics"
}

# Requests the host rates as high risk.
forbids contains "high-risk" if input.risk >= 80

# Every request states its purpose. Not in tool discovery (a gateway's tools/list, decided
# with input.tool.discovery true, no arguments and an empty purpose): a forbid over what the
# caller says would hide every tool there.
forbids contains "purpose-required" if {
	input.requested.purpose == ""
	not discovery
}

discovery if input.tool.discovery == true

# Only metric reads may be delegated, and only one level deep.
forbids contains "delegation-only-metric-reads" if {
	input.delegation_depth > 0
	not delegable
}

delegable if {
	input.action == "read"
	input.resource_kind == "metrics"
}

forbids contains "delegation-depth-limit" if input.delegation_depth > 1

# ---- the decision ----

permit_ids := sort([p.id | some p in permits])

forbid_ids := sort([f | some f in forbids])

ttls := [t | some p in permits; t := p.ttl]

delegations := [d | some p in permits; d := p.delegation]

default every_permit_requires_approval := false

every_permit_requires_approval if {
	count(permits) > 0
	every p in permits {
		p.approval
	}
}

caps := object.union(ttl_cap, delegation_cap)

ttl_cap := {"ttl_seconds": min(ttls)} if count(ttls) > 0
else := {}

delegation_cap := {"delegation": min(delegations)} if count(delegations) > 0
else := {}

decision := {"allow": false, "require_approval": false, "reasons": forbid_ids} if {
	count(forbids) > 0
} else := {"allow": false, "require_approval": false, "reasons": []} if {
	count(permits) == 0
} else := object.union(caps, {
	"allow": true,
	"require_approval": every_permit_requires_approval,
	"reasons": permit_ids,
})
