package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// workflowServer answers a failover or rollback command with a pending
// operation and then, one per GET of it, the records of script, the last
// repeated; it keeps the command's path and body.
type workflowServer struct {
	*httptest.Server
	mu     sync.Mutex
	script []commands.Operation
	gets   int
	sent   []string
}

func newWorkflowServer(t *testing.T, script []commands.Operation) *workflowServer {
	s := &workflowServer{script: script}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		first := script[0]
		switch {
		case r.Method == http.MethodPost:
			b, _ := io.ReadAll(r.Body)
			s.sent = append(s.sent, strings.TrimSpace(r.URL.Path+" "+string(b)))
			op := commands.Operation{ID: first.ID, Type: first.Type, Status: commands.StatusPending, VolumeID: first.VolumeID,
				Request: first.Request}
			w.WriteHeader(http.StatusCreated)
			_ = json.NewEncoder(w).Encode(op)
		case r.Method == http.MethodGet && r.URL.Path == "/api/v1/operations/"+first.ID:
			op := s.script[min(s.gets, len(s.script)-1)]
			s.gets++
			_ = json.NewEncoder(w).Encode(op)
		default:
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusTeapot)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *workflowServer) commandsSent() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.sent...)
}

// Ids of the failover tests.
const (
	tFO    = "op-0f0f0f0f-1a1a-4b2b-8c3c-4d4d4d4d4d4d"
	tRB    = "op-1e1e1e1e-2f2f-4a3a-8b4b-5c5c5c5c5c5c"
	tVM    = "87654321-4321-4321-4321-210987654321"
	tHost  = "11111111-2222-4333-8444-555555555555"
	tRoot  = "3f2b7c1e-8a4d-4e6f-9b0a-1c2d3e4f5a6b"
	tData  = "7d9e1f20-3b4c-4d5e-8f6a-7b8c9d0e1f2a"
	tSnap  = "5a5a5a5a-1b1b-4c2c-8d3d-4e4e4e4e4e4e"
	tChild = "op-99999999-0000-4000-8000-00000000000"
)

// failoverScript is a failover's records as it runs: each step pending,
// then done, then the end.
func failoverScript(end commands.Operation) []commands.Operation {
	plan := []commands.WorkflowStep{
		{Name: "snapshot", VolumeID: tRoot, OperationID: tChild + "0"},
		{Name: "detach", VolumeID: tRoot, VMID: tHost, OperationID: tChild + "1"},
		{Name: "attach", VolumeID: tRoot, VMID: tVM, OperationID: tChild + "2"},
		{Name: "start_vm", VMID: tVM, OperationID: tChild + "3"},
	}
	var script []commands.Operation
	for i := range plan {
		steps := make([]commands.WorkflowStep, len(plan))
		copy(steps, plan)
		for j := range steps {
			steps[j].Status = commands.StepPending
			if j < i {
				steps[j].Status = commands.StepDone
			}
		}
		script = append(script, commands.Operation{ID: end.ID, Type: end.Type, Status: commands.StatusExecuting,
			VolumeID: tRoot, Step: stepName(i, plan[i]),
			Details: map[string]any{commands.DetailStepsDone: float64(i), commands.DetailStepsTotal: float64(len(plan)),
				commands.DetailStep: stepName(i, plan[i])},
			Workflow: &commands.Workflow{Steps: steps}})
	}
	return append(script, end)
}

func stepName(i int, s commands.WorkflowStep) string {
	return strings.Join([]string{strconv.Itoa(i), s.Name, s.VolumeID}, ":")
}

// TestFailoverCommands: failover test, live and rollback send their
// command with the flags' body; --wait shows each step as it runs, then
// the snapshots and where each volume was, or, on failure, whether it was
// compensated, what is left, and what to do.
func TestFailoverCommands(t *testing.T) {
	done := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	dev := int64(2)
	completed := commands.Operation{ID: tFO, Type: commands.OpFailover, Status: commands.StatusCompleted, VolumeID: tRoot,
		CompletedAt: &done, Response: &commands.OpResponse{VolumeID: tRoot, VMID: tVM, Message: "Failover completed",
			Snapshots: map[string]string{tRoot: tSnap},
			Before: map[string]commands.Placement{tRoot: {VMID: tHost, DeviceID: &dev, ExportName: "vol3f2b7c1e",
				ExportReadOnly: true, ExportVMID: tHost}, tData: {}}}}
	undo := 1
	uncompensated := commands.Operation{ID: tFO, Type: commands.OpFailover, Status: commands.StatusFailed, VolumeID: tRoot,
		CompletedAt: &done, Error: "VM refused to start", Step: "5:attach:" + tRoot,
		Workflow: &commands.Workflow{Steps: []commands.WorkflowStep{
			{Name: "detach", VolumeID: tRoot, VMID: tHost, Status: commands.StepDone},
			{Name: "attach", VolumeID: tRoot, VMID: tVM, Status: commands.StepUndone},
			{Name: "detach", VolumeID: tRoot, VMID: tVM, Status: commands.StepDone, Undoes: &undo},
			{Name: "attach", VolumeID: tRoot, VMID: tHost, Status: commands.StepFailed, Undoes: &undo},
		}},
		Details: map[string]any{commands.DetailCompensated: false, commands.DetailLeft: []any{tRoot + " is detached"}}}
	compensated := uncompensated
	compensated.Details = map[string]any{commands.DetailCompensated: true}
	failedRollback := commands.Operation{ID: tFO, Type: commands.OpRollback, Status: commands.StatusFailed, VolumeID: tRoot,
		CompletedAt: &done, Error: "revert refused", Request: json.RawMessage(`{"failover_id":"` + tRB + `"}`),
		Details: map[string]any{commands.DetailCompensated: false, commands.DetailLeft: []any{map[string]any{"volume_id": tRoot, "vm_id": tVM}}}}

	tests := []struct {
		name   string
		args   []string
		script []commands.Operation
		sent   string
		code   int
		stdout []string
		stderr []string
	}{
		{name: "test failover completes", code: exitOK,
			args:   []string{"failover", "test", "--vm", tVM, "--root", tRoot, "--data", tData, "--data", tSnap, "--wait"},
			script: failoverScript(completed),
			sent: `/api/v1/failovers {"vm_id":"` + tVM + `","root_volume_id":"` + tRoot + `","data_volume_ids":["` + tData + `","` + tSnap +
				`"],"test":true,"start_vm":true,"force":false}`,
			stderr: []string{"[0/4] snapshot " + tRoot + " (pending)", "[1/4] detach " + tRoot + " vm " + tHost + " (pending)",
				"[2/4] attach " + tRoot + " vm " + tVM + " (pending)", "[3/4] start_vm vm " + tVM + " (pending)", tFO + " failover completed"},
			stdout: []string{"snapshot " + tRoot + "  " + tSnap, "before " + tRoot + "    vm " + tHost + ", device 2, export vol3f2b7c1e (read-only) on " + tHost,
				"before " + tData + "    detached"}},
		{name: "live failover, not started, forced", code: exitOK,
			args:   []string{"failover", "live", "--vm", tVM, "--root", tRoot, "--no-start", "--force"},
			script: []commands.Operation{completed},
			sent: `/api/v1/failovers {"vm_id":"` + tVM + `","root_volume_id":"` + tRoot + `","data_volume_ids":[],` +
				`"test":false,"start_vm":false,"force":true}`,
			stdout: []string{"status        pending"}},
		{name: "failover undone", code: exitFailed,
			args:   []string{"failover", "test", "--vm", tVM, "--root", tRoot, "--wait"},
			script: []commands.Operation{compensated},
			stdout: []string{"compensated", "true", "undo #1: detach " + tRoot + " vm " + tVM + " (done)"},
			stderr: []string{"VM refused to start", "every step it did was undone"}},
		{name: "failover left things behind", code: exitFailed,
			args:   []string{"failover", "test", "--vm", tVM, "--root", tRoot, "--wait"},
			script: []commands.Operation{uncompensated},
			stdout: []string{"compensated   false", "left          " + tRoot + " is detached",
				"undo #1: attach " + tRoot + " vm " + tHost + " (failed)", "attach " + tRoot + " vm " + tVM + " (undone)"},
			stderr: []string{"the undo could not finish", "docs/failover.md"}},
		{name: "rollback fails, ask again", code: exitFailed,
			args:   []string{"failover", "rollback", tRB, "--wait"},
			script: []commands.Operation{failedRollback},
			sent:   `/api/v1/failovers/` + tRB + `/rollback`,
			stdout: []string{`left          {"vm_id":"` + tVM + `","volume_id":"` + tRoot + `"}`},
			stderr: []string{"ask for it again: volctl failover rollback " + tRB + " --wait"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := newWorkflowServer(t, tc.script)
			var out, errb bytes.Buffer
			args := append(tc.args, "--server", srv.URL, "--timeout", "30s")
			code := run(context.Background(), args, &out, &errb)
			if code != tc.code {
				t.Fatalf("volctl %v: exit %d, want %d\nstdout: %s\nstderr: %s", args, code, tc.code, out.String(), errb.String())
			}
			if sent := srv.commandsSent(); tc.sent != "" && (len(sent) != 1 || sent[0] != tc.sent) {
				t.Errorf("sent %q, want %q", sent, tc.sent)
			}
			for _, want := range tc.stdout {
				if !strings.Contains(out.String(), want) {
					t.Errorf("stdout lacks %q:\n%s", want, out.String())
				}
			}
			for _, want := range tc.stderr {
				if !strings.Contains(errb.String(), want) {
					t.Errorf("stderr lacks %q:\n%s", want, errb.String())
				}
			}
		})
	}
}

// TestFailoverUsage: what failover refuses before any request.
func TestFailoverUsage(t *testing.T) {
	tests := []struct {
		args []string
		say  string
	}{
		{[]string{"failover", "test"}, "--vm, --root required"},
		{[]string{"failover", "live", "--vm", tVM}, "--root required"},
		{[]string{"failover", "test", "--root", tRoot, "extra", "--vm", tVM}, "want 0 argument"},
		{[]string{"failover", "rollback"}, "want 1 argument"},
		{[]string{"failover", "rollback", tFO, "--force"}, "not defined"},
		{[]string{"failover", "promote"}, "unknown command"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		code := run(context.Background(), append(tc.args, "--server", "http://127.0.0.1:1"), &out, &errb)
		if code != exitUsage || !strings.Contains(errb.String(), tc.say) {
			t.Errorf("volctl %v: exit %d, want %d saying %q\nstderr: %s", tc.args, code, exitUsage, tc.say, errb.String())
		}
	}
}
