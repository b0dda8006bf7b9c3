package httpbridge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
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
	seedWorkflow(t, h)
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

	t.Run("a workflow's record", func(t *testing.T) {
		resp, body := h.do(t, "GET", "/operations/"+opFailover, "")
		op := decodeAs[commands.Operation](t, body)
		if resp.StatusCode != http.StatusOK || op.Workflow == nil || len(op.Workflow.Steps) != 5 ||
			op.Response.Snapshots[vol1] != snap1 || op.Response.Before[vol1].ExportName != "vol3f2b7c1e" {
			t.Errorf("GET the failover: %d %s", resp.StatusCode, body)
		}
		resp, body = h.do(t, "GET", "/operations/"+opFailedRollback, "")
		op = decodeAs[commands.Operation](t, body)
		if resp.StatusCode != http.StatusOK || op.Details[commands.DetailCompensated] != false || op.ParentID != "" {
			t.Errorf("GET the failed rollback: %d %s", resp.StatusCode, body)
		}
		resp, body = h.do(t, "GET", "/operations/"+opUncompensated, "")
		op = decodeAs[commands.Operation](t, body)
		if resp.StatusCode != http.StatusOK || op.Workflow == nil || op.Workflow.Steps[3].Status != commands.StepSkipped {
			t.Errorf("GET the failover whose undo failed: %d %s", resp.StatusCode, body)
		}
	})
	t.Run("listed by type", func(t *testing.T) {
		for typ, want := range map[commands.OpType]string{commands.OpFailover: opFailover, commands.OpRollback: opFailedRollback} {
			resp, body := h.do(t, "GET", "/operations?type="+string(typ), "")
			rows := decodeAs[[]commands.OperationSummary](t, body)
			if resp.StatusCode != http.StatusOK || !slices.ContainsFunc(rows, func(r commands.OperationSummary) bool { return r.ID == want }) {
				t.Errorf("GET /operations?type=%s: %d %s", typ, resp.StatusCode, body)
			}
		}
	})
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

// opFailedRollback is a rollback of opFailover that failed, seeded by
// seedWorkflow.
const opFailedRollback = "op-1e1e1e1e-2f2f-4a3a-8b4b-5c5c5c5c5c5c"

// opUncompensated is a live failover whose undo failed (an undo step
// skipped), seeded by seedWorkflow.
const opUncompensated = "op-2d2d2d2d-3e3e-4f4f-8a5a-6b6b6b6b6b6b"

// seedWorkflow records opFailover, a completed test failover of vol1 and
// vol2 onto vm1 with every workflow field set, opFailedRollback, a
// rollback of it that failed uncompensated, and opUncompensated; the harness validates them
// against the OpenAPI document when they are read.
func seedWorkflow(t *testing.T, h *harness) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	created := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	done := created.Add(2 * time.Minute)
	vm, dev2 := vm1, int64(2)
	child := func(i int) string { return fmt.Sprintf("op-0f0f0f0f-1a1a-4b2b-8c3c-00000000000%d", i) }
	steps := []commands.WorkflowStep{
		{Name: "snapshot", VolumeID: vol1, OperationID: child(0), Status: commands.StepDone},
		{Name: "detach", VolumeID: vol1, VMID: vmEmpty, OperationID: child(1), Status: commands.StepDone},
		{Name: "attach", VolumeID: vol1, VMID: vm1, OperationID: child(2), Status: commands.StepDone},
		{Name: "attach", VolumeID: vol2, VMID: vm1, OperationID: child(3), Status: commands.StepDone},
		{Name: "start_vm", VMID: vm1, OperationID: child(4), Status: commands.StepDone},
	}
	before := map[string]commands.Placement{
		vol1: {VMID: vmEmpty, DeviceID: &dev2, ExportName: "vol3f2b7c1e", ExportVMID: vmEmpty, ExportReadOnly: true},
		vol2: {},
	}
	snaps := map[string]string{vol1: snap1}
	failover := commands.Operation{ID: opFailover, Type: commands.OpFailover, Status: commands.StatusCompleted,
		VolumeID: vol1, VMID: &vm, VolumeIDs: []string{vol1, vol2},
		Request:  json.RawMessage(`{"vm_id":"` + vm1 + `","root_volume_id":"` + vol1 + `","data_volume_ids":["` + vol2 + `"],"test":true,"start_vm":true,"force":false}`),
		Workflow: &commands.Workflow{Before: before, Snapshots: snaps, Steps: steps},
		Response: &commands.OpResponse{VolumeID: vol1, VMID: vm1, Snapshots: snaps, Before: before, Steps: steps,
			Message: "Failover completed"},
		Step: "4:start_vm:", CreatedAt: created, UpdatedAt: done, CompletedAt: &done}
	undo := 1
	rollback := commands.Operation{ID: opFailedRollback, Type: commands.OpRollback, Status: commands.StatusFailed,
		VolumeID: vol1, VMID: &vm, VolumeIDs: []string{vol1, vol2},
		Request: json.RawMessage(`{"failover_id":"` + opFailover + `"}`),
		Workflow: &commands.Workflow{Steps: []commands.WorkflowStep{
			{Name: "stop_vm", VMID: vm1, Status: commands.StepDone},
			{Name: "attach", VolumeID: vol1, VMID: vmEmpty, Status: commands.StepFailed, Undoes: &undo}}},
		Error: "attach refused", Step: "1:attach:" + vol1,
		Details: map[string]any{commands.DetailCompensated: false, commands.DetailStepsDone: 1, commands.DetailStepsTotal: 2,
			commands.DetailSteps: steps[:1], commands.DetailLeft: []string{vol1 + " detached"}},
		CreatedAt: done, UpdatedAt: done, CompletedAt: &done}
	first := 0
	uncompensated := commands.Operation{ID: opUncompensated, Type: commands.OpFailover, Status: commands.StatusFailed,
		VolumeID: vol1, VMID: &vm, VolumeIDs: []string{vol1},
		Request: json.RawMessage(`{"vm_id":"` + vm1 + `","root_volume_id":"` + vol1 + `","test":false,"start_vm":true,"force":false}`),
		Workflow: &commands.Workflow{Before: map[string]commands.Placement{vol1: before[vol1]}, Compensating: true,
			Steps: []commands.WorkflowStep{
				{Name: "detach", VolumeID: vol1, VMID: vmEmpty, Status: commands.StepDone},
				{Name: "attach", VolumeID: vol1, VMID: vm1, Status: commands.StepFailed},
				{Name: "attach", VolumeID: vol1, VMID: vmEmpty, Status: commands.StepFailed, Undoes: &first},
				{Name: "export", VolumeID: vol1, VMID: vmEmpty, Status: commands.StepSkipped, Undoes: &first}}},
		Error: "attach refused", Step: "1:attach:" + vol1,
		Details:   map[string]any{commands.DetailCompensated: false, commands.DetailLeft: []string{vol1 + " detached"}},
		CreatedAt: done, UpdatedAt: done, CompletedAt: &done}
	for _, op := range []commands.Operation{failover, rollback, uncompensated} {
		if _, err := h.store.CreateOperation(ctx, op); err != nil {
			t.Fatalf("seed %s: %v", op.ID, err)
		}
	}
}

// TestOpenAPIOpTypes: the document's OpType enum is commands.OpTypes, so
// a type added there (failover, rollback, start_vm, stop_vm) is documented.
func TestOpenAPIOpTypes(t *testing.T) {
	var doc struct {
		Components struct {
			Schemas map[string]struct {
				Enum []string `json:"enum"`
			} `json:"schemas"`
		} `json:"components"`
	}
	if err := json.Unmarshal(httpbridge.OpenAPI(), &doc); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, typ := range commands.OpTypes {
		want = append(want, string(typ))
	}
	if got := doc.Components.Schemas["OpType"].Enum; !slices.Equal(got, want) {
		t.Errorf("OpType enum %v, want commands.OpTypes %v", got, want)
	}
}
