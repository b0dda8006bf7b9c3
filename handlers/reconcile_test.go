package handlers_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
)

// TestReconcileReportsScatteredWorkflows: the reconcile names each
// failover or rollback that ended failed and not compensated, with what
// it left where; not a compensated one, nor a failed rollback asked again
// since.
func TestReconcileReportsScatteredWorkflows(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	vol, fo := uuid.NewString(), "op-"+uuid.NewString()
	at := time.Now().UTC().Add(-time.Hour)
	record := func(typ commands.OpType, status commands.OpStatus, req any, details map[string]any) string {
		t.Helper()
		raw, _ := json.Marshal(req)
		at = at.Add(time.Minute)
		op := commands.Operation{ID: "op-" + uuid.NewString(), Type: typ, Status: status, VolumeID: vol, Request: raw,
			Details: details, CreatedAt: at, UpdatedAt: at}
		if status.Terminal() {
			op.CompletedAt = &at
		}
		if _, err := h.store.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
		return op.ID
	}
	scattered := map[string]any{"code": commands.CodeCloudStackError, commands.DetailCompensated: false,
		commands.DetailLeft: []string{"volume " + vol + " is detached; it was on VM x", "snapshot s of volume " + vol + " is kept"}}
	rbReq := commands.RollbackRequest{FailoverID: fo}
	cases := []struct {
		name     string
		typ      commands.OpType
		status   commands.OpStatus
		req      any
		details  map[string]any
		reported bool
		id       string
	}{
		{name: "failover not compensated", typ: commands.OpFailover, status: commands.StatusFailed, req: commands.FailoverRequest{},
			details: scattered, reported: true},
		{name: "failover compensated", typ: commands.OpFailover, status: commands.StatusFailed, req: commands.FailoverRequest{},
			details: map[string]any{"code": commands.CodeCloudStackError, commands.DetailCompensated: true}},
		{name: "rollback failed, asked again since", typ: commands.OpRollback, status: commands.StatusFailed, req: rbReq, details: scattered},
		{name: "the rollback asked again", typ: commands.OpRollback, status: commands.StatusCompleted, req: rbReq},
		{name: "rollback failed last", typ: commands.OpRollback, status: commands.StatusFailed, req: rbReq, details: scattered, reported: true},
	}
	for i := range cases {
		cases[i].id = record(cases[i].typ, cases[i].status, cases[i].req, cases[i].details)
	}
	res, err := h.svc.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		n := slices.IndexFunc(res.Errors, func(e string) bool { return strings.Contains(e, tc.id) })
		if (n >= 0) != tc.reported {
			t.Fatalf("%s: reported %v, want %v: %q", tc.name, n >= 0, tc.reported, res.Errors)
		}
		if n >= 0 && (!strings.Contains(res.Errors[n], "not compensated") || !strings.Contains(res.Errors[n], "snapshot s of volume "+vol+" is kept")) {
			t.Fatalf("%s: report %q", tc.name, res.Errors[n])
		}
	}
	if len(res.Errors) != 2 || res.Message != "Force sync completed with errors" {
		t.Fatalf("reconcile: %+v", res)
	}
}
