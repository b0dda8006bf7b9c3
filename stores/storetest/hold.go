package storetest

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Failover returns a terminal failover of root ended at end; test says
// whether it is a test failover (one that took snapshots).
func Failover(n int, status commands.OpStatus, root string, test bool, end time.Time) commands.Operation {
	op := Op(n, commands.OpFailover, status, root, "vm-test", end.Add(-time.Minute))
	op.Request = json.RawMessage(fmt.Sprintf(`{"vm_id":"vm-test","root_volume_id":%q,"test":%t,"start_vm":true}`, root, test))
	op.Workflow = &commands.Workflow{Steps: []commands.WorkflowStep{}}
	if test {
		op.Workflow.Snapshots = map[string]string{root: "snap-" + ID(n)}
	}
	op.CompletedAt, op.UpdatedAt = &end, end
	return op
}

// Rollback returns a rollback of the failover failoverID of root, in
// status, ended at end when status is terminal.
func Rollback(n int, status commands.OpStatus, failoverID, root string, end time.Time) commands.Operation {
	op := Op(n, commands.OpRollback, status, root, "vm-test", end.Add(-time.Minute))
	op.Request = json.RawMessage(fmt.Sprintf(`{"failover_id":%q}`, failoverID))
	if status.Terminal() {
		op.CompletedAt, op.UpdatedAt = &end, end
	}
	return op
}

// testPruneHolds: the retention holds a completed test failover and the
// failed and cancelled rollbacks of it, however old, until a rollback of
// it completes or fails NOT_FOUND, then counts their end from that
// rollback's; the completed
// rollback goes no earlier than its failover (it is what closes it), yet
// in the same call; held operations take no place in a limited prune;
// every other terminal operation is pruned as ever; counts stay those of
// the listings.
func testPruneHolds(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	at := func(d time.Duration) time.Time { return base.Add(d) }
	cut := at(time.Hour)
	open := Failover(1, commands.StatusCompleted, "vol-1", true, at(time.Minute))
	openFailed := Rollback(2, commands.StatusFailed, open.ID, "vol-1", at(2*time.Minute))
	openCancelled := Rollback(3, commands.StatusCancelled, open.ID, "vol-1", at(3*time.Minute))
	live := Failover(4, commands.StatusCompleted, "vol-2", false, at(time.Minute))
	back := Failover(5, commands.StatusCompleted, "vol-3", true, at(time.Minute))
	backDone := Rollback(6, commands.StatusCompleted, back.ID, "vol-3", at(30*time.Minute))
	backFailed := Rollback(7, commands.StatusFailed, back.ID, "vol-3", at(10*time.Minute))
	late := Failover(8, commands.StatusCompleted, "vol-4", true, at(time.Minute))
	lateDone := Rollback(9, commands.StatusCompleted, late.ID, "vol-4", at(2*time.Hour))
	lateFailed := Rollback(10, commands.StatusFailed, late.ID, "vol-4", at(5*time.Minute))
	failed := Failover(11, commands.StatusFailed, "vol-5", true, at(time.Minute))
	orphan := Rollback(12, commands.StatusFailed, ID(99), "vol-6", at(time.Minute))
	attach := Op(13, commands.OpAttach, commands.StatusCompleted, "vol-1", "vm-1", base)
	attach.CompletedAt = &attach.CreatedAt
	// A rollback that failed NOT_FOUND (a volume gone) closes its
	// failover as a completed one does; one that failed otherwise does
	// not.
	gone := Failover(15, commands.StatusCompleted, "vol-7", true, at(time.Minute))
	goneFailed := Rollback(16, commands.StatusFailed, gone.ID, "vol-7", at(4*time.Minute))
	goneFailed.Details = map[string]any{"code": commands.CodeNotFound}
	goneFailedEarlier := Rollback(17, commands.StatusFailed, gone.ID, "vol-7", at(2*time.Minute))
	goneFailedEarlier.Details = map[string]any{"code": commands.CodeConflict}
	openFailed.Details = map[string]any{"code": commands.CodeConflict}
	// Created first: the held ones are the oldest.
	mustCreate(t, s, open, openFailed, openCancelled, late, lateDone, lateFailed, live, back, backDone, backFailed,
		failed, orphan, attach, gone, goneFailed, goneFailedEarlier)

	// Limit 1: the held ones never fill a batch.
	for i := range 10 {
		if n, err := s.PruneOperations(ctx, cut, 1); err != nil || n != 1 {
			t.Fatalf("prune %d with limit 1: %d, %v", i, n, err)
		}
	}
	if n, err := s.PruneOperations(ctx, cut, 0); err != nil || n != 0 {
		t.Fatalf("prune again: %d, %v", n, err)
	}
	kept := []string{open.ID, openFailed.ID, openCancelled.ID, late.ID, lateDone.ID, lateFailed.ID}
	wantLeft(t, s, kept...)

	// The open failover's rollback completes: held until an hour past its
	// end, then pruned with its failed and cancelled rollbacks.
	rb := Rollback(14, commands.StatusExecuting, open.ID, "vol-1", at(3*time.Hour))
	rb = mustCreate(t, s, rb)[0]
	if n, err := s.PruneOperations(ctx, at(4*time.Hour), 0); err != nil || n != 3 {
		t.Fatalf("prune while the rollback runs: %d, %v; want the 3 of the rolled back failover", n, err)
	}
	wantLeft(t, s, open.ID, openFailed.ID, openCancelled.ID, rb.ID)
	end := at(3 * time.Hour)
	rb.Status, rb.CompletedAt, rb.UpdatedAt = commands.StatusCompleted, &end, end
	mustUpdate(t, s, rb)
	if n, err := s.PruneOperations(ctx, end, 0); err != nil || n != 0 {
		t.Fatalf("prune before the rollback's end: %d, %v", n, err)
	}
	wantLeft(t, s, open.ID, openFailed.ID, openCancelled.ID, rb.ID)
	if n, err := s.PruneOperations(ctx, end.Add(time.Second), 0); err != nil || n != 4 {
		t.Fatalf("prune after the rollback's end: %d, %v; want 4", n, err)
	}
	wantLeft(t, s)
}

// testPruneHoldsForARollbackAskedAgain: a rollback that failed NOT_FOUND
// closes its failover, yet a failed rollback may be asked again; while
// that one is pending (or executing) the failover, which it reads, and
// the failed rollback are kept, however old.
func testPruneHoldsForARollbackAskedAgain(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	at := func(d time.Duration) time.Time { return base.Add(d) }
	fo := Failover(1, commands.StatusCompleted, "vol-1", true, at(time.Minute))
	gone := Rollback(2, commands.StatusFailed, fo.ID, "vol-1", at(2*time.Minute))
	gone.Details = map[string]any{"code": commands.CodeNotFound}
	again := Rollback(3, commands.StatusPending, fo.ID, "vol-1", at(3*time.Minute))
	mustCreate(t, s, fo, gone, again)
	if n, err := s.PruneOperations(ctx, at(time.Hour), 0); err != nil || n != 0 {
		t.Fatalf("prune while a rollback of the failover is pending: %d, %v; want 0", n, err)
	}
	wantLeft(t, s, fo.ID, gone.ID, again.ID)
}

// wantLeft fails unless the store lists exactly ids, and counts what it
// lists.
func wantLeft(t testing.TB, s state.Store, ids ...string) {
	t.Helper()
	want := slices.Clone(ids)
	slices.Sort(want)
	got := ListIDs(t, s, state.Filter{})
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("left %v, want %v", got, want)
	}
	st, err := s.Stats(ctxFor(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.Total != int64(len(want)) || st.Terminal+st.ByStatus[commands.StatusExecuting]+st.ByStatus[commands.StatusPending] != st.Total {
		t.Fatalf("stats %+v of %d listed", st, len(want))
	}
	for _, typ := range []commands.OpType{commands.OpFailover, commands.OpRollback} {
		if n := len(ListIDs(t, s, state.Filter{Type: typ})); st.ByType[typ] != int64(n) {
			t.Fatalf("stats count %d of type %s, list %d", st.ByType[typ], typ, n)
		}
	}
}
