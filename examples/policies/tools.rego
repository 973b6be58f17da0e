# An example policy for MCP tool calls through the gateway (Rego): the same decisions as
# tools.cedar; tools.tests.json holds the tests both must pass.
#
# A tool call's intent is action "tools.call" on resource "mcp/<server>/<tool>"; the authority
# derives it from the call and binds the token to the SHA-256 of the exact arguments. The call
# is input.tool: server, name, arguments (the JSON object), arguments_sha256, discovery.
#
# Discovery: a gateway asks which tools a caller could ever call (tools/list) with
# input.tool.discovery true and empty arguments; a tool is listed unless that is a deny. A rule
# that tests arguments is undefined there (Rego's undefined is false), so a permit that tests
# them gets a discovery rule of its own, and a forbid over them never fires in discovery. A
# delegated tool-call token is decided without the arguments (no input.tool.arguments).
package authority

is_agent if {
	input.principal_trust_domain == "example.org"
	startswith(input.principal_path, "/agent/")
}

tool_call(resource) if {
	input.action == "tools.call"
	input.resource == resource
}

# ---- billing ----

permits contains {"id": "tools-billing-get-invoice", "ttl": 60, "delegation": 1, "approval": false} if {
	is_agent
	tool_call("mcp/billing/get_invoice")
}

# Refunds of less than 500 (a whole amount, in the currency's smallest unit).
permits contains {"id": "tools-billing-refund-small", "ttl": 60, "approval": false} if {
	is_agent
	tool_call("mcp/billing/refund")
	input.tool.discovery
}

permits contains {"id": "tools-billing-refund-small", "ttl": 60, "approval": false} if {
	is_agent
	tool_call("mcp/billing/refund")
	amount := input.tool.arguments.amount
	is_number(amount)
	amount == round(amount)
	amount > 0
	amount < 500
}

# ---- deploy ----

permits contains {"id": "tools-deploy-staging", "ttl": 120, "approval": false} if {
	is_agent
	tool_call("mcp/deploy/deploy")
	input.tool.discovery
}

permits contains {"id": "tools-deploy-staging", "ttl": 120, "approval": false} if {
	is_agent
	tool_call("mcp/deploy/deploy")
	input.tool.arguments.environment == "staging"
}

# Production: only once an operator approved this very call.
permits contains {"id": "tools-deploy-production", "ttl": 60, "approval": true} if {
	is_agent
	tool_call("mcp/deploy/deploy")
	input.tool.arguments.environment == "production"
}

# ---- never ----

# No delete_* tool on any server, called or listed.
forbids contains "tools-never-delete" if {
	input.action == "tools.call"
	startswith(input.tool.name, "delete_")
}

# ---- the decision (as agents.rego builds it) ----

permit_ids := sort({p.id | some p in permits})

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
