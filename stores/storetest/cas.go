package storetest

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// wantErr fails unless err wraps want (nil: no error).
func wantErr(t testing.TB, what string, err, want error) {
	t.Helper()
	if (want == nil) != (err == nil) || (want != nil && !errors.Is(err, want)) {
		t.Fatalf("%s: %v, want %v", what, err, want)
	}
}

// getOp reads an operation, failing the test on error.
func getOp(t testing.TB, s state.Store, id string) commands.Operation {
	t.Helper()
	op, err := s.GetOperation(ctxFor(t), id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return op
}

// testStaleOperationWrites: an update carrying a revision that is not the
// record's is refused and changes nothing, whoever wrote in between.
func testStaleOperationWrites(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	op := mustCreate(t, s, Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", base))[0]
	// Two writers read the same revision; the first write wins.
	first, second := op, op
	first.Status, first.Step = commands.StatusExecuting, "first"
	second.Status, second.Step = commands.StatusExecuting, "second"
	first = mustUpdate(t, s, first)
	_, err := s.UpdateOperation(ctx, second)
	wantErr(t, "second writer", err, state.ErrStale)
	if errors.Is(err, state.ErrNotFound) {
		t.Fatalf("second writer: %v says not found", err)
	}
	// A late write of a terminal status on an old revision (a stale
	// "executing" must not land after "completed", nor the reverse).
	done := base.Add(time.Minute)
	completed := first
	completed.Status, completed.CompletedAt = commands.StatusCompleted, &done
	completed = mustUpdate(t, s, completed)
	late := first
	late.Step = "late"
	_, err = s.UpdateOperation(ctx, late)
	wantErr(t, "late executing write", err, state.ErrStale)
	for _, rev := range []uint64{0, first.Revision, completed.Revision + 1000} {
		again := completed
		again.Revision, again.Error = rev, "overwritten"
		_, err := s.UpdateOperation(ctx, again)
		wantErr(t, fmt.Sprintf("write at revision %d", rev), err, state.ErrStale)
	}
	got := getOp(t, s, op.ID)
	sameJSON(t, got, completed)
	if got.Revision != completed.Revision {
		t.Fatalf("revision %d, want %d", got.Revision, completed.Revision)
	}
	if ids := ListIDs(t, s, state.Filter{Status: commands.StatusExecuting}); len(ids) != 0 {
		t.Fatalf("refused writes moved the indexes: executing %v", ids)
	}
	wantStats(t, s, 1, 1, time.Minute, map[commands.OpType]int64{commands.OpAttach: 1},
		map[commands.OpStatus]int64{commands.StatusCompleted: 1})
}

// testTransitions: every status move the state machine forbids is
// refused with ErrTransition and changes nothing; the allowed ones pass.
func testTransitions(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	allowed := map[[2]commands.OpStatus]bool{
		{commands.StatusPending, commands.StatusExecuting}:   true,
		{commands.StatusPending, commands.StatusFailed}:      true,
		{commands.StatusPending, commands.StatusCancelled}:   true,
		{commands.StatusExecuting, commands.StatusExecuting}: true,
		{commands.StatusExecuting, commands.StatusCompleted}: true,
		{commands.StatusExecuting, commands.StatusFailed}:    true,
		{commands.StatusExecuting, commands.StatusCancelled}: true,
	}
	n := 0
	for _, from := range commands.OpStatuses {
		for _, to := range commands.OpStatuses {
			n++
			t.Run(fmt.Sprintf("%s to %s", from, to), func(t *testing.T) {
				want := allowed[[2]commands.OpStatus{from, to}]
				if got := state.CanMove(from, to); got != want {
					t.Fatalf("CanMove = %v, want %v", got, want)
				}
				op := mustCreate(t, s, Op(n, commands.OpDetach, from, "vol-t", "", base))[0]
				next := op
				next.Status, next.Step = to, "moved"
				_, err := s.UpdateOperation(ctx, next)
				if want {
					wantErr(t, "allowed move", err, nil)
					return
				}
				wantErr(t, "forbidden move", err, state.ErrTransition)
				got := getOp(t, s, op.ID)
				if got.Status != from || got.Step != "" || got.Revision != op.Revision {
					t.Fatalf("refused move wrote: %+v", got)
				}
			})
		}
	}
}

// testCASIncrements: concurrent read-modify-writes of one operation lose
// no update.
func testCASIncrements(t *testing.T, s state.Store) {
	op := mustCreate(t, s, Op(1, commands.OpAttach, commands.StatusExecuting, "vol-1", "", base))[0]
	Increments(t, op.ID, 15, s, s, s, s)
}

// Increments runs one writer per store (a store may come several times),
// each adding 1 to the attempts of operation id each times by
// read-modify-write: a lost race is ErrStale, and the writer re-reads and
// tries again. It fails the test unless no increment was lost.
func Increments(t *testing.T, id string, each int, stores ...state.Store) {
	ctx := ctxFor(t)
	start := getOp(t, stores[0], id).Attempts
	var wg sync.WaitGroup
	var stale atomic.Int64
	for w, s := range stores {
		wg.Go(func() {
			for n := 0; n < each; {
				cur, err := s.GetOperation(ctx, id)
				if err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				cur.Attempts++
				_, err = s.UpdateOperation(ctx, cur)
				switch {
				case errors.Is(err, state.ErrStale):
					stale.Add(1)
				case err != nil:
					t.Errorf("writer %d: %v", w, err)
					return
				default:
					n++
				}
			}
		})
	}
	wg.Wait()
	if got, want := getOp(t, stores[0], id).Attempts, start+len(stores)*each; got != want {
		t.Fatalf("attempts %d after %d increments from %d", got, len(stores)*each, start)
	}
	t.Logf("%d stale writes refused", stale.Load())
}

// testDeleteOperation: a delete is a compare-and-swap too, and takes the
// record's index entries and counts with it.
func testDeleteOperation(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	done := base.Add(2 * time.Second)
	a := Op(1, commands.OpAttach, commands.StatusExecuting, "vol-1", "vm-1", base)
	b := Op(2, commands.OpAttach, commands.StatusCompleted, "vol-1", "vm-1", base.Add(time.Second))
	b.CompletedAt = &done
	created := mustCreate(t, s, a, b)
	a, b = created[0], created[1]
	moved := mustUpdate(t, s, a)

	wantErr(t, "delete at an old revision", s.DeleteOperation(ctx, a.ID, a.Revision), state.ErrStale)
	wantErr(t, "delete at revision 0", s.DeleteOperation(ctx, a.ID, 0), state.ErrStale)
	if got := getOp(t, s, a.ID); got.Revision != moved.Revision {
		t.Fatalf("refused delete changed the record: %+v", got)
	}
	wantErr(t, "delete", s.DeleteOperation(ctx, b.ID, b.Revision), nil)
	if _, err := s.GetOperation(ctx, b.ID); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	for _, f := range []state.Filter{{}, {VolumeID: "vol-1"}, {VMID: "vm-1"}, {Type: commands.OpAttach}, {Status: commands.StatusExecuting}} {
		if got := ListIDs(t, s, f); !slices.Equal(got, wantIDs(1)) {
			t.Fatalf("list %+v after delete = %v", f, got)
		}
	}
	if got := ListIDs(t, s, state.Filter{Status: commands.StatusCompleted}); len(got) != 0 {
		t.Fatalf("completed after delete = %v", got)
	}
	wantStats(t, s, 1, 0, 0, map[commands.OpType]int64{commands.OpAttach: 1},
		map[commands.OpStatus]int64{commands.StatusExecuting: 1})
	wantErr(t, "delete again", s.DeleteOperation(ctx, b.ID, b.Revision), nil)
	wantErr(t, "delete unknown", s.DeleteOperation(ctx, ID(9), 5), nil)
	// A stale writer cannot bring the deleted record back.
	late := b
	late.Step = "late"
	if _, err := s.UpdateOperation(ctx, late); !errors.Is(err, state.ErrStale) || !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("update of a deleted operation: %v, want ErrStale and ErrNotFound", err)
	}
	// The id is free again (an idempotency key outlives nothing).
	again := mustCreate(t, s, Op(2, commands.OpDelete, commands.StatusPending, "vol-2", "", base))[0]
	if again.Revision == b.Revision {
		t.Fatalf("a new record reuses revision %d", again.Revision)
	}
	if _, err := s.UpdateOperation(ctx, late); !errors.Is(err, state.ErrStale) {
		t.Fatalf("stale write over the re-created record: %v", err)
	}
}

// testPrune: PruneOperations removes terminal operations completed before
// the cut, with their index entries and counts, up to the limit, and
// keeps everything else.
func testPrune(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	cut := base.Add(time.Hour)
	at := func(d time.Duration) *time.Time { v := base.Add(d); return &v }
	var ops []commands.Operation
	var old []string
	for i := range 12 {
		status := []commands.OpStatus{commands.StatusCompleted, commands.StatusFailed, commands.StatusCancelled}[i%3]
		op := Op(i+1, commands.OpTypes[i%len(commands.OpTypes)], status, fmt.Sprintf("vol-%d", i%2), "vm-1", base.Add(time.Duration(i)*time.Second))
		op.CompletedAt = at(time.Duration(i) * time.Minute)
		ops = append(ops, op)
		old = append(old, op.ID)
	}
	// Terminal but completed after the cut, created before it.
	late := Op(20, commands.OpAttach, commands.StatusCompleted, "vol-0", "vm-1", base)
	late.CompletedAt = at(2 * time.Hour)
	// Unfinished, however old.
	pending := Op(21, commands.OpAttach, commands.StatusPending, "vol-0", "vm-1", base.Add(-time.Hour))
	executing := Op(22, commands.OpDetach, commands.StatusExecuting, "vol-1", "vm-1", base.Add(-time.Hour))
	// Created after the cut.
	recent := Op(23, commands.OpCreate, commands.StatusFailed, "vol-1", "", cut.Add(time.Minute))
	recent.CompletedAt = at(2 * time.Hour)
	mustCreate(t, s, append(ops, late, pending, executing, recent)...)

	n, err := s.PruneOperations(ctx, cut, 5)
	if err != nil || n != 5 {
		t.Fatalf("prune with limit 5: %d, %v", n, err)
	}
	n, err = s.PruneOperations(ctx, cut, 0)
	if err != nil || n != 7 {
		t.Fatalf("prune the rest: %d, %v; want 7", n, err)
	}
	if n, err = s.PruneOperations(ctx, cut, 0); err != nil || n != 0 {
		t.Fatalf("prune again: %d, %v", n, err)
	}
	for _, id := range old {
		if _, err := s.GetOperation(ctx, id); !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("pruned %s: %v", id, err)
		}
	}
	keep := wantIDs(23, 20, 21, 22)
	slices.Sort(keep)
	for _, f := range []state.Filter{{}, {VMID: "vm-1"}, {VolumeID: "vol-0"}, {VolumeID: "vol-1"}, {Status: commands.StatusCompleted},
		{Status: commands.StatusFailed}, {Status: commands.StatusCancelled}, {Type: commands.OpAttach}} {
		got := ListIDs(t, s, f)
		for _, id := range got {
			if _, ok := slices.BinarySearch(keep, id); !ok {
				t.Fatalf("list %+v still has pruned %s", f, id)
			}
		}
	}
	if got := ListIDs(t, s, state.Filter{}); len(got) != 4 {
		t.Fatalf("left %v", got)
	}
	wantStats(t, s, 4, 2, 3*time.Hour-time.Minute,
		map[commands.OpType]int64{commands.OpAttach: 2, commands.OpDetach: 1, commands.OpCreate: 1},
		map[commands.OpStatus]int64{commands.StatusCompleted: 1, commands.StatusFailed: 1, commands.StatusPending: 1, commands.StatusExecuting: 1})
}

// testPagination: walking every page of a filter with a cursor gives the
// same list as one unlimited call, each page ending with a cursor and the
// last one with ""; a deleted cursor row still works, and a cursor that is
// not one is a bad request.
func testPagination(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	var ops []commands.Operation
	for i := range 23 {
		// Pairs share a creation instant: the id breaks the tie.
		ops = append(ops, Op(i+1, commands.OpTypes[i%3], commands.OpStatuses[i%2], fmt.Sprintf("vol-%d", i%3), "", base.Add(time.Duration(i/2)*time.Second)))
	}
	ops = mustCreate(t, s, ops...)
	for _, f := range []state.Filter{{}, {VolumeID: "vol-1"}, {Type: commands.OpTypes[0], Status: commands.OpStatuses[0]}, {VolumeID: "vol-z"}} {
		for _, limit := range []int{1, 2, 3, 7, 23, 50} {
			want := reference(ops, f)
			var got []string
			cursor, pages := "", 0
			for {
				page := f
				page.Limit, page.Cursor = limit, cursor
				rows, next, err := s.ListOperations(ctx, page)
				if err != nil {
					t.Fatalf("list %+v: %v", page, err)
				}
				pages++
				got = append(got, IDs(rows)...)
				if len(rows) > limit || (next != "" && len(rows) != limit) {
					t.Fatalf("page %d of %+v: %d rows, next %q", pages, page, len(rows), next)
				}
				if next == "" {
					break
				}
				if pages > len(ops)+1 {
					t.Fatalf("%+v: no end after %d pages", f, pages)
				}
				cursor = next
			}
			if !slices.Equal(got, want) {
				t.Fatalf("pages of %+v limit %d = %v, want %v", f, limit, got, want)
			}
			if wantPages := max(1, (len(want)+limit-1)/limit); pages != wantPages {
				t.Fatalf("%+v limit %d: %d pages for %d rows", f, limit, pages, len(want))
			}
		}
	}
	// The row a cursor names is deleted: the next page still follows it.
	first, next, err := s.ListOperations(ctx, state.Filter{Limit: 5})
	if err != nil || next == "" {
		t.Fatalf("first page: %v, %q", err, next)
	}
	last := first[len(first)-1]
	if err := s.DeleteOperation(ctx, last.ID, last.Revision); err != nil {
		t.Fatal(err)
	}
	rows, _, err := s.ListOperations(ctx, state.Filter{Limit: 3, Cursor: next})
	if err != nil {
		t.Fatal(err)
	}
	all := ListIDs(t, s, state.Filter{})
	if i := slices.Index(all, first[3].ID); !slices.Equal(IDs(rows), all[i+1:i+4]) {
		t.Fatalf("after a deleted cursor row: %v, want %v", IDs(rows), all[i+1:i+4])
	}
	for _, bad := range []string{"x", "bm90IGEgY3Vyc29y", "!!!"} {
		_, _, err := s.ListOperations(ctx, state.Filter{Cursor: bad})
		if e := state.APIError(err); err == nil || e.Code != commands.CodeInvalidRequest {
			t.Fatalf("cursor %q: %v", bad, err)
		}
	}
}

// testMappingCAS: mapping writes are compare-and-swap; revision 0 only
// creates, and no stale writer can bring back a deleted mapping.
func testMappingCAS(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	m := mustPut(t, s, Mapping("vol-1", "vm-1", "/dev/vdb"))
	if m.Revision == 0 {
		t.Fatal("put returned no revision")
	}
	if got, err := s.GetMapping(ctx, "vol-1"); err != nil || got.Revision != m.Revision {
		t.Fatalf("get: %+v, %v; want revision %d", got, err, m.Revision)
	}
	dup := Mapping("vol-1", "vm-1", "/dev/vdc")
	_, err := s.PutMapping(ctx, dup)
	wantErr(t, "create over an existing mapping", err, state.ErrStale)

	// Two writers read m; the first write wins.
	a, b := m, m
	a.LinuxState, b.LinuxState = commands.LinuxMissing, commands.LinuxNotApplicable
	a = mustPut(t, s, a)
	_, err = s.PutMapping(ctx, b)
	wantErr(t, "second writer", err, state.ErrStale)
	wantErr(t, "delete at an old revision", s.DeleteMapping(ctx, "vol-1", m.Revision), state.ErrStale)
	got, err := s.GetMapping(ctx, "vol-1")
	if err != nil || got.LinuxState != commands.LinuxMissing || got.Revision != a.Revision {
		t.Fatalf("after refused writes: %+v, %v", got, err)
	}
	wantDevice(t, s, "vm-1", "/dev/vdb", "vol-1")
	wantDevice(t, s, "vm-1", "/dev/vdc", "")

	// A detach deletes it; a writer holding the read from before cannot
	// resurrect it, nor take the device back.
	wantErr(t, "delete", s.DeleteMapping(ctx, "vol-1", a.Revision), nil)
	late := a
	late.DevicePath = "/dev/vdd"
	if _, err := s.PutMapping(ctx, late); !errors.Is(err, state.ErrStale) || !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("stale put after delete: %v, want ErrStale and ErrNotFound", err)
	}
	if _, err := s.GetMapping(ctx, "vol-1"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("deleted mapping came back: %v", err)
	}
	wantDevice(t, s, "vm-1", "/dev/vdb", "")
	wantDevice(t, s, "vm-1", "/dev/vdd", "")
	if got := mappingVolumes(t, s, ""); len(got) != 0 {
		t.Fatalf("listed after delete: %v", got)
	}
	// A new attach creates it again, with a revision never given before.
	again := mustPut(t, s, Mapping("vol-1", "vm-1", "/dev/vdb"))
	if again.Revision == a.Revision || again.Revision == m.Revision {
		t.Fatalf("recreated mapping reuses revision %d", again.Revision)
	}
	_, err = s.PutMapping(ctx, a)
	wantErr(t, "write at the revision before the delete", err, state.ErrStale)
	ms, err := s.ListMappings(ctx, "vm-1")
	if err != nil || len(ms) != 1 || ms[0].Revision != again.Revision {
		t.Fatalf("list: %+v, %v; want revision %d", ms, err, again.Revision)
	}
	if byDev, err := s.GetMappingByDevice(ctx, "vm-1", "/dev/vdb"); err != nil || byDev.Revision != again.Revision {
		t.Fatalf("by device: %+v, %v; want revision %d", byDev, err, again.Revision)
	}
	// Unconditional delete (revision 0) removes whatever is there.
	wantErr(t, "unconditional delete", s.DeleteMapping(ctx, "vol-1", 0), nil)
	if _, err := s.GetMapping(ctx, "vol-1"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("after unconditional delete: %v", err)
	}
}

// testExportCAS: export writes are compare-and-swap like mappings.
func testExportCAS(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	e, err := s.PutExport(ctx, Export(ID(1), true))
	if err != nil || e.Revision == 0 {
		t.Fatalf("put: %+v, %v", e, err)
	}
	_, err = s.PutExport(ctx, Export(ID(1), false))
	wantErr(t, "create over an existing export", err, state.ErrStale)
	a, b := e, e
	a.ReadOnly, b.Status = false, "other"
	if a, err = s.PutExport(ctx, a); err != nil {
		t.Fatal(err)
	}
	_, err = s.PutExport(ctx, b)
	wantErr(t, "second writer", err, state.ErrStale)
	wantErr(t, "delete at an old revision", s.DeleteExport(ctx, ID(1), e.Revision), state.ErrStale)
	got, err := s.GetExport(ctx, ID(1))
	if err != nil || got.ReadOnly || got.Revision != a.Revision {
		t.Fatalf("after refused writes: %+v, %v", got, err)
	}
	es, err := s.ListExports(ctx)
	if err != nil || len(es) != 1 || es[0].Revision != a.Revision {
		t.Fatalf("list: %+v, %v", es, err)
	}
	wantErr(t, "delete", s.DeleteExport(ctx, ID(1), a.Revision), nil)
	if _, err := s.PutExport(ctx, a); !errors.Is(err, state.ErrStale) || !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("stale put after delete: %v", err)
	}
	if got := exportVolumes(t, s); len(got) != 0 {
		t.Fatalf("deleted export came back: %v", got)
	}
}

// testLeases: one holder at a time, tokens that grow, renewals and
// releases fenced by the token, and expiry by the store's clock.
func testLeases(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	const ttl = 30 * time.Second
	before := time.Now()
	a, err := s.AcquireLease(ctx, "vm:vm-1", "a", ttl)
	if err != nil {
		t.Fatal(err)
	}
	if a.Name != "vm:vm-1" || a.Holder != "a" || a.Token == 0 || a.TTL != ttl ||
		a.Expires.Before(before.Add(ttl)) || a.Expires.After(time.Now().Add(ttl)) {
		t.Fatalf("acquired %+v", a)
	}
	_, err = s.AcquireLease(ctx, "vm:vm-1", "b", ttl)
	wantErr(t, "another holder", err, state.ErrLeaseHeld)
	other, err := s.AcquireLease(ctx, "vm:vm-2", "b", ttl)
	if err != nil {
		t.Fatalf("another lease: %v", err)
	}

	renewed, err := s.RenewLease(ctx, a)
	if err != nil || renewed.Token <= a.Token || renewed.Holder != "a" || renewed.Expires.Before(a.Expires) {
		t.Fatalf("renew: %+v, %v (was %+v)", renewed, err, a)
	}
	_, err = s.RenewLease(ctx, a)
	wantErr(t, "renew with the token before the renewal", err, state.ErrLeaseLost)
	wantErr(t, "release with an old token", s.ReleaseLease(ctx, a), state.ErrLeaseLost)
	// The same holder taking it again gets a new token; the old one is
	// fenced off.
	again, err := s.AcquireLease(ctx, "vm:vm-1", "a", ttl)
	if err != nil || again.Token <= renewed.Token {
		t.Fatalf("acquire again: %+v, %v", again, err)
	}
	_, err = s.RenewLease(ctx, renewed)
	wantErr(t, "renew with the token before acquiring again", err, state.ErrLeaseLost)

	wantErr(t, "release", s.ReleaseLease(ctx, again), nil)
	wantErr(t, "release twice", s.ReleaseLease(ctx, again), state.ErrLeaseLost)
	_, err = s.RenewLease(ctx, again)
	wantErr(t, "renew a released lease", err, state.ErrLeaseLost)
	b, err := s.AcquireLease(ctx, "vm:vm-1", "b", ttl)
	if err != nil || b.Token <= again.Token {
		t.Fatalf("acquire after release: %+v, %v", b, err)
	}
	if err := s.ReleaseLease(ctx, other); err != nil {
		t.Fatal(err)
	}

	// Expiry: nobody renews, and the store's clock ends the lease.
	short, err := s.AcquireLease(ctx, "reconcile", "a", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var taken state.Lease
	testenv.Eventually(t, 15*time.Second, func() bool {
		taken, err = s.AcquireLease(ctx, "reconcile", "b", 10*time.Second)
		if err != nil && !errors.Is(err, state.ErrLeaseHeld) {
			t.Fatalf("acquire before expiry: %v", err)
		}
		return err == nil
	}, "the expired lease taken by another holder")
	if time.Since(short.Expires) < -time.Second/2 {
		t.Fatalf("taken over %v before it was due to expire", time.Until(short.Expires))
	}
	if taken.Token <= short.Token {
		t.Fatalf("token %d after %d", taken.Token, short.Token)
	}
	_, err = s.RenewLease(ctx, short)
	wantErr(t, "renew an expired lease", err, state.ErrLeaseLost)
	wantErr(t, "release an expired lease", s.ReleaseLease(ctx, short), state.ErrLeaseLost)
	if _, err := s.RenewLease(ctx, taken); err != nil {
		t.Fatalf("new holder renews: %v", err)
	}

	for _, bad := range []struct {
		name, holder string
		ttl          time.Duration
	}{{"", "a", ttl}, {"x", "", ttl}, {"x", "a", time.Millisecond}} {
		if _, err := s.AcquireLease(ctx, bad.name, bad.holder, bad.ttl); err == nil || errors.Is(err, state.ErrUnavailable) {
			t.Fatalf("acquire %+v: %v", bad, err)
		}
	}
}

// testAnnotate: the one change a terminal operation allows is a
// details-only rewrite of a failed one (state.CanAnnotate), as a
// compare-and-swap; it moves no index and no count, and retention still
// counts from the completion. Any other change of a failed operation, and
// any change of a completed or cancelled one, is ErrTransition and writes
// nothing.
func testAnnotate(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	done := base.Add(time.Minute)
	failed := Op(1, commands.OpAttach, commands.StatusExecuting, "vol-1", "vm-1", base)
	failed.Step, failed.JobID, failed.Attempts = "attach:job", "job-1", 1
	failed = mustCreate(t, s, failed)[0]
	failed.Status, failed.CompletedAt, failed.UpdatedAt = commands.StatusFailed, &done, done
	failed.Error = "attachVolume job did not finish within 1s"
	failed.Details = map[string]any{"code": "TIMEOUT", "job_may_run": true, "cloudstack_job_id": "job-1"}
	failed = mustUpdate(t, s, failed)

	// Any other field changed, with the details: refused, nothing written.
	other := "vm-2"
	when := base.Add(time.Hour)
	for _, tc := range []struct {
		field  string
		change func(op *commands.Operation)
	}{
		{"type", func(op *commands.Operation) { op.Type = commands.OpDetach }},
		{"status", func(op *commands.Operation) { op.Status = commands.StatusCompleted }},
		{"volume_id", func(op *commands.Operation) { op.VolumeID = "vol-2" }},
		{"vm_id", func(op *commands.Operation) { op.VMID = &other }},
		{"vm_id dropped", func(op *commands.Operation) { op.VMID = nil }},
		{"request", func(op *commands.Operation) { op.Request = json.RawMessage(`{"n":2}`) }},
		{"response", func(op *commands.Operation) { op.Response = &commands.OpResponse{Message: "done"} }},
		{"error", func(op *commands.Operation) { op.Error = "another error" }},
		{"step", func(op *commands.Operation) { op.Step = "attach:correlate" }},
		{"job", func(op *commands.Operation) { op.JobID = "job-2" }},
		{"attempts", func(op *commands.Operation) { op.Attempts++ }},
		{"created_at", func(op *commands.Operation) { op.CreatedAt = op.CreatedAt.Add(time.Second) }},
		{"completed_at", func(op *commands.Operation) { op.CompletedAt = &when }},
		{"completed_at dropped", func(op *commands.Operation) { op.CompletedAt = nil }},
	} {
		t.Run("refused "+tc.field, func(t *testing.T) {
			next := failed
			next.Details = map[string]any{"code": "TIMEOUT", "job_may_run": false}
			next.UpdatedAt = when
			tc.change(&next)
			if state.CanAnnotate(failed, next) {
				t.Fatalf("CanAnnotate allows a change of %s", tc.field)
			}
			_, err := s.UpdateOperation(ctx, next)
			wantErr(t, "update of "+tc.field, err, state.ErrTransition)
			got := getOp(t, s, failed.ID)
			sameJSON(t, got, failed)
			if got.Revision != failed.Revision {
				t.Fatalf("refused annotation wrote: revision %d, want %d", got.Revision, failed.Revision)
			}
		})
	}

	// Details and the update time only: allowed, at the revision read.
	note := failed
	note.Details = map[string]any{"code": "TIMEOUT", "job_may_run": false, "cloudstack_job_id": "job-1",
		"job_status": "succeeded", "resolution": "the job succeeded"}
	note.UpdatedAt = when
	if !state.CanAnnotate(failed, note) {
		t.Fatal("CanAnnotate refuses a details-only change")
	}
	// A compacted and a spaced request are the same request.
	spaced := note
	spaced.Request = json.RawMessage(` { "n" : 1 } `)
	if !state.CanAnnotate(failed, spaced) {
		t.Fatal("CanAnnotate refuses the same request with other spacing")
	}
	annotated := mustUpdate(t, s, note)
	got := getOp(t, s, failed.ID)
	sameJSON(t, got, note)
	if got.Revision != annotated.Revision {
		t.Fatalf("revision %d after the annotation, want %d", got.Revision, annotated.Revision)
	}
	// Again on the revision before it: stale.
	late := failed
	late.Details = map[string]any{"code": "TIMEOUT", "job_may_run": false, "job_status": "unknown"}
	_, err := s.UpdateOperation(ctx, late)
	wantErr(t, "annotation at an old revision", err, state.ErrStale)
	sameJSON(t, getOp(t, s, failed.ID), note)
	// Annotated again at its new revision: allowed.
	again := annotated
	again.Details = maps.Clone(annotated.Details)
	again.Details["resolved_at"] = when.Format(time.RFC3339)
	annotated = mustUpdate(t, s, again)

	// Indexes and counts as before the annotations.
	for f, want := range map[state.Filter][]string{
		{}: wantIDs(1), {Status: commands.StatusFailed}: wantIDs(1), {VolumeID: "vol-1"}: wantIDs(1),
		{VMID: "vm-1"}: wantIDs(1), {Type: commands.OpAttach}: wantIDs(1),
		{Status: commands.StatusExecuting}: wantIDs(),
	} {
		if got := ListIDs(t, s, f); !slices.Equal(got, want) {
			t.Fatalf("list %+v after the annotation = %v, want %v", f, got, want)
		}
	}
	wantStats(t, s, 1, 1, time.Minute, map[commands.OpType]int64{commands.OpAttach: 1},
		map[commands.OpStatus]int64{commands.StatusFailed: 1})

	// Completed and cancelled operations never change, not even details.
	for i, status := range []commands.OpStatus{commands.StatusCompleted, commands.StatusCancelled} {
		t.Run("refused on "+string(status), func(t *testing.T) {
			op := Op(10+i, commands.OpCreate, status, "vol-3", "", base)
			op.CompletedAt, op.Details = &done, map[string]any{"code": "TIMEOUT"}
			op = mustCreate(t, s, op)[0]
			next := op
			next.Details, next.UpdatedAt = map[string]any{"code": "TIMEOUT", "job_may_run": false}, when
			if state.CanAnnotate(op, next) {
				t.Fatalf("CanAnnotate allows a change of a %s operation", status)
			}
			_, err := s.UpdateOperation(ctx, next)
			wantErr(t, "annotation of a "+string(status)+" operation", err, state.ErrTransition)
			if got := getOp(t, s, op.ID); got.Revision != op.Revision {
				t.Fatalf("refused annotation wrote: %+v", got)
			}
		})
	}

	// Retention counts from the completion, not from the annotation: an
	// annotated operation that completed before the cut is pruned.
	n, err := s.PruneOperations(ctx, base.Add(2*time.Minute), 0)
	if err != nil || n != 3 {
		t.Fatalf("prune after the annotation: %d, %v; want 3", n, err)
	}
	if _, err := s.GetOperation(ctx, annotated.ID); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("annotated operation completed before the cut not pruned: %v", err)
	}
	wantStats(t, s, 0, 0, 0, nil, nil)
}
