package httpbridge_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
)

// opFailover is the completed failover TestFailoverEndpoints rolls back.
const opFailover = "op-0f0f0f0f-1a1a-4b2b-8c3c-4d4d4d4d4d4d"

// TestFailoverEndpoints: POST /failovers sends its body as it is on
// volumes.cmd.failover; POST /failovers/{id}/rollback sends
// {"failover_id": id} (normalized) on volumes.cmd.rollback; bad ids and
// bodies are refused in the documented format before any command is sent.
// Every response is validated against the OpenAPI document.
func TestFailoverEndpoints(t *testing.T) {
	h := newHarness(t, options{})
	h.seedOperation(t, opFailover, commands.OpFailover, commands.StatusCompleted, vol1, vm1, 40)
	bare := strings.TrimPrefix(opFailover, "op-")
	sent := func(subject, body string) func(*testing.T, []byte) {
		return func(t *testing.T, _ []byte) {
			if got := h.commands.last(); got.subject != subject || strings.TrimSpace(got.body) != body {
				t.Errorf("sent %s %s, want %s %s", got.subject, got.body, subject, body)
			}
		}
	}
	both := func(checks ...func(*testing.T, []byte)) func(*testing.T, []byte) {
		return func(t *testing.T, body []byte) {
			for _, c := range checks {
				c(t, body)
			}
		}
	}
	cases := []endpointCase{
		{name: "test failover", method: "POST", path: "/failovers", body: "failover.json", status: http.StatusCreated,
			check: both(accepted(commands.OpFailover, vol1, vm1, map[string]any{"vm_id": vm1, "root_volume_id": vol1,
				"test": true, "start_vm": true, "force": false}),
				sent(commands.SubjectFailover, strings.TrimSpace(readTestdata(t, "failover.json"))))},
		{name: "live failover", method: "POST", path: "/failovers", body: "failover_live.json", status: http.StatusCreated,
			check: accepted(commands.OpFailover, vol1, vm1, map[string]any{"test": false, "start_vm": false, "force": true})},
		{name: "failover without root", method: "POST", path: "/failovers", body: "failover_no_root.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "root_volume_id"},
		{name: "failover root among data", method: "POST", path: "/failovers", body: "failover_root_twice.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "data_volume_ids"},
		{name: "failover unknown field", method: "POST", path: "/failovers", body: "failover_unknown_field.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "dry_run"},
		{name: "failover empty body", method: "POST", path: "/failovers",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "vm_id"},
		{name: "failover unknown volume", method: "POST", path: "/failovers", body: "failover_unknown_volume.json",
			status: http.StatusNotFound, code: commands.CodeNotFound},
		{name: "failovers by GET", method: "GET", path: "/failovers",
			status: http.StatusMethodNotAllowed, code: commands.CodeInvalidRequest},
		{name: "rollback", method: "POST", path: "/failovers/" + opFailover + "/rollback", status: http.StatusCreated,
			check: both(accepted(commands.OpRollback, vol1, vm1, map[string]any{"failover_id": opFailover}),
				sent(commands.SubjectRollback, `{"failover_id":"`+opFailover+`"}`))},
		{name: "rollback of a bare upper-case id", method: "POST", path: "/failovers/" + strings.ToUpper(bare) + "/rollback",
			body: "empty_object.json", status: http.StatusCreated,
			check: sent(commands.SubjectRollback, `{"failover_id":"`+opFailover+`"}`)},
		{name: "rollback body names the same failover", method: "POST", path: "/failovers/" + bare + "/rollback",
			body: "rollback_same_failover.json", status: http.StatusCreated, check: accepted(commands.OpRollback, vol1, vm1, map[string]any{"failover_id": opFailover})},
		{name: "rollback bad id", method: "POST", path: "/failovers/nope/rollback",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "operation_id"},
		{name: "rollback volume id prefix", method: "POST", path: "/failovers/vol-" + bare + "/rollback",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "operation_id"},
		{name: "rollback body names another failover", method: "POST", path: "/failovers/" + opFailover + "/rollback",
			body: "rollback_other_failover.json", status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "failover_id"},
		{name: "rollback body is an array", method: "POST", path: "/failovers/" + opFailover + "/rollback", body: "array.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest},
		{name: "rollback of an unknown failover", method: "POST", path: "/failovers/" + opNotThere + "/rollback",
			status: http.StatusNotFound, code: commands.CodeNotFound},
	}
	runCases(t, h, cases)

	t.Run("refused ids send nothing", func(t *testing.T) {
		before := len(h.commands.sentAll())
		for _, p := range []string{"/failovers/nope/rollback", "/failovers/" + vol1 + "x/rollback"} {
			if resp, body := h.do(t, "POST", p, ""); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("POST %s: %d %s", p, resp.StatusCode, body)
			}
		}
		if after := len(h.commands.sentAll()); after != before {
			t.Errorf("%d commands sent for refused ids", after-before)
		}
	})
}
