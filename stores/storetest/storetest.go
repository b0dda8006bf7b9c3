// Package storetest is the conformance suite and the benchmarks every
// state.Store backend runs.
package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Open returns a new, empty store for one test; it closes it at cleanup.
type Open func(t testing.TB) state.Store

// base is the creation time the suite's operations count from.
var base = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// ID returns the n-th test id; ids sort in the order of n.
func ID(n int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012d", n) }

// Op returns an operation for tests; vm "" means no VM.
func Op(n int, typ commands.OpType, status commands.OpStatus, volume, vm string, created time.Time) commands.Operation {
	op := commands.Operation{ID: ID(n), Type: typ, Status: status, VolumeID: volume,
		Request:   json.RawMessage(fmt.Sprintf(`{"n":%d}`, n)),
		CreatedAt: created, UpdatedAt: created}
	if vm != "" {
		op.VMID = &vm
	}
	return op
}

func ctxFor(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// Run runs the conformance suite, each subtest on a store from open.
func Run(t *testing.T, open Open) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, s state.Store)
	}{
		{"CreateGet", testCreateGet},
		{"CreateErrors", testCreateErrors},
		{"NotFound", testNotFound},
		{"ListFilters", testListFilters},
		{"ListOrder", testListOrder},
		{"ListRequestedBy", testListRequestedBy},
		{"IndexMoves", testIndexMoves},
		{"Stats", testStats},
		{"Writes", testWrites},
		{"Mappings", testMappings},
		{"MappingConflictAndMoves", testMappingConflictAndMoves},
		{"Exports", testExports},
		{"ConcurrentWriters", testConcurrentWriters},
		{"StaleOperationWrites", testStaleOperationWrites},
		{"Transitions", testTransitions},
		{"Annotate", testAnnotate},
		{"CASIncrements", testCASIncrements},
		{"DeleteOperation", testDeleteOperation},
		{"Prune", testPrune},
		{"PruneHolds", testPruneHolds},
		{"PruneHoldsForARollbackAskedAgain", testPruneHoldsForARollbackAskedAgain},
		{"Pagination", testPagination},
		{"MappingCAS", testMappingCAS},
		{"ExportCAS", testExportCAS},
		{"Leases", testLeases},
		{"PingClose", testPingClose},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, open(t)) })
	}
}

// sameJSON fails unless got and want encode to the same JSON.
func sameJSON(t testing.TB, got, want any) {
	t.Helper()
	g, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	w, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	if string(g) != string(w) {
		t.Fatalf("got  %s\nwant %s", g, w)
	}
}

// mustCreate creates ops and returns them with their revisions.
func mustCreate(t testing.TB, s state.Store, ops ...commands.Operation) []commands.Operation {
	t.Helper()
	out := make([]commands.Operation, len(ops))
	for i, op := range ops {
		var err error
		if out[i], err = s.CreateOperation(ctxFor(t), op); err != nil {
			t.Fatalf("create %s: %v", op.ID, err)
		}
		if out[i].Revision == 0 {
			t.Fatalf("create %s returned no revision", op.ID)
		}
	}
	return out
}

// mustUpdate updates op and returns it with its new revision.
func mustUpdate(t testing.TB, s state.Store, op commands.Operation) commands.Operation {
	t.Helper()
	got, err := s.UpdateOperation(ctxFor(t), op)
	if err != nil {
		t.Fatalf("update %s at %d: %v", op.ID, op.Revision, err)
	}
	if got.Revision == op.Revision || got.Revision == 0 {
		t.Fatalf("update %s: revision %d after %d", op.ID, got.Revision, op.Revision)
	}
	return got
}

// mustPut writes a mapping and returns it with its new revision.
func mustPut(t testing.TB, s state.Store, m commands.Mapping) commands.Mapping {
	t.Helper()
	got, err := s.PutMapping(ctxFor(t), m)
	if err != nil {
		t.Fatalf("put mapping %s at %d: %v", m.VolumeID, m.Revision, err)
	}
	return got
}

// IDs returns the ids of ops, in order.
func IDs(ops []commands.Operation) []string {
	out := []string{}
	for _, op := range ops {
		out = append(out, op.ID)
	}
	return out
}

// ListIDs lists with f and returns the ids in order.
func ListIDs(t testing.TB, s state.Store, f state.Filter) []string {
	t.Helper()
	ops, _, err := s.ListOperations(ctxFor(t), f)
	if err != nil {
		t.Fatalf("list %+v: %v", f, err)
	}
	return IDs(ops)
}

func wantIDs(ns ...int) []string {
	out := []string{}
	for _, n := range ns {
		out = append(out, ID(n))
	}
	return out
}

func testCreateGet(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	done := base.Add(3 * time.Second)
	dev := int64(1)
	want := Op(1, commands.OpAttach, commands.StatusExecuting, "vol-1", "vm-1", base)
	want.Response = &commands.OpResponse{VolumeID: "vol-1", VMID: "vm-1", DevicePath: "/dev/vdb", DeviceID: &dev, Message: "attached"}
	want.Details = map[string]any{"cloudstack_error_code": "530"}
	want.Step, want.JobID, want.Attempts = "wait-device", "job-1", 2
	want.Revision = 99 // ignored by a create
	want = mustCreate(t, s, want)[0]
	got, err := s.GetOperation(ctx, want.ID)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, want)
	if got.Revision != want.Revision {
		t.Fatalf("get: revision %d, create returned %d", got.Revision, want.Revision)
	}

	want.Status, want.Error, want.CompletedAt = commands.StatusFailed, "device never appeared", &done
	want = mustUpdate(t, s, want)
	if got, err = s.GetOperation(ctx, want.ID); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, want)
	if got.Revision != want.Revision {
		t.Fatalf("get: revision %d, update returned %d", got.Revision, want.Revision)
	}
	listedOps, _, err := s.ListOperations(ctx, state.Filter{VolumeID: "vol-1"})
	if err != nil || len(listedOps) != 1 || listedOps[0].Revision != want.Revision {
		t.Fatalf("list: %+v, %v; want revision %d", listedOps, err, want.Revision)
	}
	if data, _ := json.Marshal(got); strings.Contains(string(data), "evision") {
		t.Fatalf("the revision is serialized: %s", data)
	}
}

func testCreateErrors(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	first := Op(1, commands.OpCreate, commands.StatusPending, "vol-1", "", base)
	mustCreate(t, s, first)
	for _, tc := range []struct {
		name string
		op   commands.Operation
		want error // nil: any error that is not ErrUnavailable
	}{
		{"existing id", Op(1, commands.OpDelete, commands.StatusFailed, "vol-2", "vm-2", base.Add(time.Hour)), state.ErrExists},
		{"no id", func() commands.Operation {
			op := Op(2, commands.OpCreate, commands.StatusPending, "", "", base)
			op.ID = ""
			return op
		}(), nil},
		{"no type", Op(3, "", commands.StatusPending, "", "", base), nil},
		{"no status", Op(4, commands.OpCreate, "", "", "", base), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.CreateOperation(ctx, tc.op)
			switch {
			case err == nil:
				t.Fatal("created")
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("error %v, want %v", err, tc.want)
			case errors.Is(err, state.ErrUnavailable):
				t.Fatalf("error %v is not a bad input", err)
			}
		})
	}
	// Nothing of the refused creates was written.
	got, err := s.GetOperation(ctx, first.ID)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, first)
	if got := ListIDs(t, s, state.Filter{}); !slices.Equal(got, wantIDs(1)) {
		t.Fatalf("list all = %v", got)
	}
	for _, f := range []state.Filter{{Type: commands.OpDelete}, {Status: commands.StatusFailed},
		{VolumeID: "vol-2"}, {VMID: "vm-2"}} {
		if got := ListIDs(t, s, f); len(got) != 0 {
			t.Fatalf("list %+v = %v after refused create", f, got)
		}
	}
	st, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Total != 1 || st.ByType[commands.OpDelete] != 0 || st.ByStatus[commands.StatusFailed] != 0 || st.Terminal != 0 {
		t.Fatalf("stats after refused create: %+v", st)
	}
}

func testNotFound(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	if _, err := s.GetOperation(ctx, ID(9)); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	unknown := Op(9, commands.OpAttach, commands.StatusCompleted, "vol-9", "vm-9", base)
	unknown.Revision = 1
	_, err := s.UpdateOperation(ctx, unknown)
	if !errors.Is(err, state.ErrNotFound) || !errors.Is(err, state.ErrStale) {
		t.Fatalf("update unknown: %v", err)
	}
	if _, err := s.GetOperation(ctx, ID(9)); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("update of an unknown id created it: %v", err)
	}
	for _, f := range []state.Filter{{}, {Status: commands.StatusCompleted}, {VolumeID: "vol-9"}, {VMID: "vm-9"}} {
		if got := ListIDs(t, s, f); len(got) != 0 {
			t.Fatalf("list %+v = %v", f, got)
		}
	}
	if st, err := s.Stats(ctx); err != nil || st.Total != 0 || st.Terminal != 0 {
		t.Fatalf("stats %+v, %v", st, err)
	}
}

// dataset is the operations testListFilters lists, created in this order.
var dataset = []commands.Operation{
	Op(1, commands.OpCreate, commands.StatusCompleted, "vol-a", "", base.Add(1*time.Second)),
	Op(5, commands.OpAttach, commands.StatusPending, "vol-c", "vm-2", base.Add(5*time.Second)),
	Op(2, commands.OpAttach, commands.StatusCompleted, "vol-a", "vm-1", base.Add(2*time.Second)),
	Op(3, commands.OpAttach, commands.StatusFailed, "vol-b", "vm-1", base.Add(3*time.Second)),
	Op(4, commands.OpDetach, commands.StatusExecuting, "vol-a", "vm-1", base.Add(4*time.Second)),
	Op(6, commands.OpDelete, commands.StatusPending, "vol-b", "", base.Add(6*time.Second)),
	Op(8, commands.OpCreate, commands.StatusPending, "", "", base.Add(8*time.Second)),
	Op(7, commands.OpAttach, commands.StatusCompleted, "vol-c", "vm-2", base.Add(7*time.Second)),
}

func testListFilters(t *testing.T, s state.Store) {
	mustCreate(t, s, dataset...)
	for _, tc := range []struct {
		name string
		f    state.Filter
		want []string
	}{
		{"all", state.Filter{}, wantIDs(8, 7, 6, 5, 4, 3, 2, 1)},
		{"limit", state.Filter{Limit: 3}, wantIDs(8, 7, 6)},
		{"limit above count", state.Filter{Limit: 100}, wantIDs(8, 7, 6, 5, 4, 3, 2, 1)},
		{"type", state.Filter{Type: commands.OpAttach}, wantIDs(7, 5, 3, 2)},
		{"status", state.Filter{Status: commands.StatusPending}, wantIDs(8, 6, 5)},
		{"volume", state.Filter{VolumeID: "vol-a"}, wantIDs(4, 2, 1)},
		{"vm", state.Filter{VMID: "vm-1"}, wantIDs(4, 3, 2)},
		{"type+status", state.Filter{Type: commands.OpAttach, Status: commands.StatusCompleted}, wantIDs(7, 2)},
		{"type+vm", state.Filter{Type: commands.OpAttach, VMID: "vm-1"}, wantIDs(3, 2)},
		{"status+volume", state.Filter{Status: commands.StatusCompleted, VolumeID: "vol-a"}, wantIDs(2, 1)},
		{"volume+vm", state.Filter{VolumeID: "vol-a", VMID: "vm-1"}, wantIDs(4, 2)},
		{"all four", state.Filter{Type: commands.OpAttach, Status: commands.StatusCompleted, VolumeID: "vol-c", VMID: "vm-2"}, wantIDs(7)},
		{"type+limit", state.Filter{Type: commands.OpAttach, Limit: 2}, wantIDs(7, 5)},
		{"status+volume+limit", state.Filter{Status: commands.StatusPending, VolumeID: "vol-b", Limit: 1}, wantIDs(6)},
		{"disjoint filters", state.Filter{Type: commands.OpDetach, VMID: "vm-2"}, wantIDs()},
		{"unknown volume", state.Filter{VolumeID: "vol-z"}, wantIDs()},
		{"unknown vm with type", state.Filter{VMID: "vm-z", Type: commands.OpAttach}, wantIDs()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ListIDs(t, s, tc.f); !slices.Equal(got, tc.want) {
				t.Fatalf("list %+v = %v, want %v", tc.f, got, tc.want)
			}
		})
	}
	// Every combination of filter values against a plain filter-and-sort.
	types := append([]commands.OpType{""}, commands.OpTypes...)
	statuses := append([]commands.OpStatus{""}, commands.OpStatuses...)
	for _, typ := range types {
		for _, st := range statuses {
			for _, vol := range []string{"", "vol-a", "vol-b", "vol-c"} {
				for _, vm := range []string{"", "vm-1", "vm-2"} {
					for _, limit := range []int{0, 2} {
						f := state.Filter{Type: typ, Status: st, VolumeID: vol, VMID: vm, Limit: limit}
						if got, want := ListIDs(t, s, f), reference(dataset, f); !slices.Equal(got, want) {
							t.Fatalf("list %+v = %v, want %v", f, got, want)
						}
					}
				}
			}
		}
	}
}

// reference lists ops by checking every one: the model the stores must
// agree with.
func reference(ops []commands.Operation, f state.Filter) []string {
	var keep []commands.Operation
	for _, op := range ops {
		vm := ""
		if op.VMID != nil {
			vm = *op.VMID
		}
		if (f.Type == "" || op.Type == f.Type) && (f.Status == "" || op.Status == f.Status) &&
			(f.VolumeID == "" || op.VolumeID == f.VolumeID) && (f.VMID == "" || vm == f.VMID) {
			keep = append(keep, op)
		}
	}
	slices.SortFunc(keep, func(a, b commands.Operation) int {
		if c := b.CreatedAt.Compare(a.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(b.ID, a.ID)
	})
	if f.Limit > 0 && len(keep) > f.Limit {
		keep = keep[:f.Limit]
	}
	return IDs(keep)
}

// testListRequestedBy: the requested_by filter alone, with the others,
// paged, and after a delete; records without a requester (written before
// it existed) match no requester.
func testListRequestedBy(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	by := map[int]string{1: "api-token:alice@127.0.0.1", 2: "nats:bob", 3: "api-token:alice@127.0.0.1",
		4: "api-token:alice@127.0.0.1", 5: "", 6: "api-token:alice@127.0.0.1"}
	var ops []commands.Operation
	for n := 1; n <= 6; n++ {
		typ := commands.OpAttach
		if n%2 == 0 {
			typ = commands.OpDetach
		}
		op := Op(n, typ, commands.StatusPending, fmt.Sprintf("vol-%d", n%2), "vm-1", base.Add(time.Duration(n)*time.Second))
		op.RequestedBy = by[n]
		ops = append(ops, op)
	}
	ops = mustCreate(t, s, ops...)
	alice := by[1]
	for _, tc := range []struct {
		name string
		f    state.Filter
		want []string
	}{
		{"alone", state.Filter{RequestedBy: alice}, wantIDs(6, 4, 3, 1)},
		{"other", state.Filter{RequestedBy: "nats:bob"}, wantIDs(2)},
		{"unknown", state.Filter{RequestedBy: "nats:carol"}, wantIDs()},
		{"with type", state.Filter{RequestedBy: alice, Type: commands.OpAttach}, wantIDs(3, 1)},
		{"with volume and vm", state.Filter{RequestedBy: alice, VolumeID: "vol-0", VMID: "vm-1"}, wantIDs(6, 4)},
		{"with status", state.Filter{RequestedBy: "nats:bob", Status: commands.StatusCompleted}, wantIDs()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ListIDs(t, s, tc.f); !slices.Equal(got, tc.want) {
				t.Fatalf("list %+v = %v, want %v", tc.f, got, tc.want)
			}
		})
	}
	var got []string
	f := state.Filter{RequestedBy: alice, Limit: 3}
	for range 3 {
		page, next, err := s.ListOperations(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		for _, op := range page {
			if op.RequestedBy != alice {
				t.Fatalf("listed %s requested by %q", op.ID, op.RequestedBy)
			}
		}
		got = append(got, IDs(page)...)
		if f.Cursor = next; next == "" {
			break
		}
	}
	if want := wantIDs(6, 4, 3, 1); !slices.Equal(got, want) {
		t.Fatalf("paged %v, want %v", got, want)
	}
	if err := s.DeleteOperation(ctx, ops[3].ID, ops[3].Revision); err != nil {
		t.Fatal(err)
	}
	if got := ListIDs(t, s, state.Filter{RequestedBy: alice}); !slices.Equal(got, wantIDs(6, 3, 1)) {
		t.Fatalf("after deleting 4: %v", got)
	}
}

func testListOrder(t *testing.T, s state.Store) {
	// 1, 2, 3 share a creation instant; 4 and 5 are later in the same
	// millisecond. Created out of order.
	mustCreate(t, s,
		Op(2, commands.OpAttach, commands.StatusPending, "vol-1", "", base),
		Op(5, commands.OpAttach, commands.StatusPending, "vol-1", "", base.Add(100*time.Microsecond)),
		Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "", base),
		Op(4, commands.OpAttach, commands.StatusPending, "vol-1", "", base.Add(300*time.Microsecond)),
		Op(3, commands.OpAttach, commands.StatusPending, "vol-1", "", base),
	)
	want := wantIDs(4, 5, 3, 2, 1)
	for _, f := range []state.Filter{{}, {VolumeID: "vol-1"}, {Type: commands.OpAttach, Status: commands.StatusPending}} {
		if got := ListIDs(t, s, f); !slices.Equal(got, want) {
			t.Fatalf("list %+v = %v, want %v", f, got, want)
		}
	}
	f := state.Filter{VolumeID: "vol-1", Limit: 4}
	if got := ListIDs(t, s, f); !slices.Equal(got, want[:4]) {
		t.Fatalf("list %+v = %v, want %v", f, got, want[:4])
	}
}

func testIndexMoves(t *testing.T, s state.Store) {
	x := Op(1, commands.OpCreate, commands.StatusPending, "", "", base)
	y := Op(2, commands.OpAttach, commands.StatusPending, "vol-new", "vm-a", base.Add(-time.Second))
	x = mustCreate(t, s, x, y)[0]
	vm := func(id string) *string { return &id }
	done := base.Add(time.Minute)
	for _, step := range []struct {
		name   string
		change func(op *commands.Operation)
		want   map[state.Filter][]string
	}{
		{"pending to executing", func(op *commands.Operation) { op.Status = commands.StatusExecuting },
			map[state.Filter][]string{
				{Status: commands.StatusPending}:   wantIDs(2),
				{Status: commands.StatusExecuting}: wantIDs(1),
			}},
		{"volume appears", func(op *commands.Operation) { op.VolumeID = "vol-new" },
			map[state.Filter][]string{
				{VolumeID: "vol-new"}: wantIDs(1, 2),
				{VolumeID: "vol-new", Status: commands.StatusPending}: wantIDs(2),
			}},
		{"vm appears", func(op *commands.Operation) { op.VMID = vm("vm-a") },
			map[state.Filter][]string{
				{VMID: "vm-a"}:                          wantIDs(1, 2),
				{VMID: "vm-a", Type: commands.OpCreate}: wantIDs(1),
			}},
		{"vm and volume move", func(op *commands.Operation) { op.VMID, op.VolumeID = vm("vm-b"), "vol-other" },
			map[state.Filter][]string{
				{VMID: "vm-a"}:          wantIDs(2),
				{VMID: "vm-b"}:          wantIDs(1),
				{VolumeID: "vol-new"}:   wantIDs(2),
				{VolumeID: "vol-other"}: wantIDs(1),
			}},
		{"vm dropped", func(op *commands.Operation) { op.VMID = nil },
			map[state.Filter][]string{
				{VMID: "vm-b"}:          wantIDs(),
				{VolumeID: "vol-other"}: wantIDs(1),
			}},
		{"completes", func(op *commands.Operation) { op.Status, op.CompletedAt = commands.StatusCompleted, &done },
			map[state.Filter][]string{
				{Status: commands.StatusExecuting}:                        wantIDs(),
				{Status: commands.StatusCompleted}:                        wantIDs(1),
				{Status: commands.StatusCompleted, VolumeID: "vol-other"}: wantIDs(1),
				{Type: commands.OpCreate}:                                 wantIDs(1),
				{}:                                                        wantIDs(1, 2),
			}},
	} {
		t.Run(step.name, func(t *testing.T) {
			step.change(&x)
			x = mustUpdate(t, s, x)
			for f, want := range step.want {
				if got := ListIDs(t, s, f); !slices.Equal(got, want) {
					t.Fatalf("list %+v = %v, want %v", f, got, want)
				}
			}
		})
	}
}

// wantStats checks the counts of st; absent map keys must be zero.
func wantStats(t testing.TB, s state.Store, total, terminal int64, dur time.Duration,
	byType map[commands.OpType]int64, byStatus map[commands.OpStatus]int64) {
	t.Helper()
	st, err := s.Stats(ctxFor(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.Total != total || st.Terminal != terminal || st.TerminalDuration != dur {
		t.Fatalf("total %d terminal %d duration %v, want %d %d %v", st.Total, st.Terminal, st.TerminalDuration, total, terminal, dur)
	}
	for _, typ := range commands.OpTypes {
		if st.ByType[typ] != byType[typ] {
			t.Fatalf("by type %v, want %v", st.ByType, byType)
		}
	}
	for _, status := range commands.OpStatuses {
		if st.ByStatus[status] != byStatus[status] {
			t.Fatalf("by status %v, want %v", st.ByStatus, byStatus)
		}
	}
}

func testStats(t *testing.T, s state.Store) {
	at := func(d time.Duration) *time.Time { v := base.Add(d); return &v }
	wantStats(t, s, 0, 0, 0, nil, nil)

	a := Op(1, commands.OpCreate, commands.StatusPending, "vol-1", "", base)
	b := Op(2, commands.OpAttach, commands.StatusExecuting, "vol-1", "vm-1", base)
	c := Op(3, commands.OpDetach, commands.StatusCompleted, "vol-1", "vm-1", base)
	c.CompletedAt = at(5 * time.Second)
	created := mustCreate(t, s, a, b, c)
	a, b, c = created[0], created[1], created[2]
	wantStats(t, s, 3, 1, 5*time.Second,
		map[commands.OpType]int64{commands.OpCreate: 1, commands.OpAttach: 1, commands.OpDetach: 1},
		map[commands.OpStatus]int64{commands.StatusPending: 1, commands.StatusExecuting: 1, commands.StatusCompleted: 1})

	b.Status, b.CompletedAt = commands.StatusCompleted, at(2*time.Second)
	b = mustUpdate(t, s, b)
	b.Attempts = 3 // updated again while terminal: refused, counted once
	if _, err := s.UpdateOperation(ctxFor(t), b); !errors.Is(err, state.ErrTransition) {
		t.Fatalf("update of a terminal operation: %v, want ErrTransition", err)
	}
	wantStats(t, s, 3, 2, 7*time.Second,
		map[commands.OpType]int64{commands.OpCreate: 1, commands.OpAttach: 1, commands.OpDetach: 1},
		map[commands.OpStatus]int64{commands.StatusPending: 1, commands.StatusCompleted: 2})

	a.Status, a.CompletedAt = commands.StatusFailed, at(time.Second)
	_ = mustUpdate(t, s, a)
	wantStats(t, s, 3, 3, 8*time.Second,
		map[commands.OpType]int64{commands.OpCreate: 1, commands.OpAttach: 1, commands.OpDetach: 1},
		map[commands.OpStatus]int64{commands.StatusCompleted: 2, commands.StatusFailed: 1})
}

func testWrites(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	before, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	op := mustCreate(t, s, Op(1, commands.OpCreate, commands.StatusPending, "vol-1", "", base))[0] // 1
	_, _ = s.CreateOperation(ctx, op)                                                              // refused: exists
	op.Status = commands.StatusExecuting
	op = mustUpdate(t, s, op) // 2
	op.Revision--
	_, _ = s.UpdateOperation(ctx, op)                                                                       // refused: stale
	_, _ = s.UpdateOperation(ctx, Op(2, commands.OpCreate, commands.StatusPending, "", "", base))           // refused: unknown
	m := mustPut(t, s, commands.Mapping{ID: "m1", VolumeID: "vol-1", VMID: "vm-1", DevicePath: "/dev/vdb"}) // 3
	m.VolumeID, m.Revision = "vol-2", 0
	_, _ = s.PutMapping(ctx, m) // refused: conflict
	after, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Writes - before.Writes; got != 3 {
		t.Fatalf("writes went up by %d, want 3", got)
	}
}

// Mapping returns a mapping for tests.
func Mapping(volume, vm, dev string) commands.Mapping {
	return commands.Mapping{ID: "map-" + volume, VolumeID: volume, VMID: vm, DevicePath: dev,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected,
		Size: 1 << 30, CreatedAt: base, UpdatedAt: base, LastSync: base}
}

// mappingVolumes lists the mappings of vmID and returns their volume ids.
func mappingVolumes(t testing.TB, s state.Store, vmID string) []string {
	t.Helper()
	ms, err := s.ListMappings(ctxFor(t), vmID)
	if err != nil {
		t.Fatalf("list mappings of %q: %v", vmID, err)
	}
	out := []string{}
	for _, m := range ms {
		out = append(out, m.VolumeID)
	}
	return out
}

// wantDevice checks which volume holds dev on vm ("" for none).
func wantDevice(t testing.TB, s state.Store, vm, dev, volume string) {
	t.Helper()
	m, err := s.GetMappingByDevice(ctxFor(t), vm, dev)
	switch {
	case volume == "" && !errors.Is(err, state.ErrNotFound):
		t.Fatalf("device %s on %s: %+v, %v; want ErrNotFound", dev, vm, m, err)
	case volume != "" && (err != nil || m.VolumeID != volume):
		t.Fatalf("device %s on %s: %+v, %v; want volume %s", dev, vm, m, err, volume)
	}
}

// vmDevice names a device path on a VM.
type vmDevice struct{ vm, dev string }

func testMappings(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	m1, m2, m3 := Mapping("vol-1", "vm-1", "/dev/vdb"), Mapping("vol-2", "vm-1", "/dev/vdc"), Mapping("vol-3", "vm-2", "/dev/vdd")
	dev := int64(4)
	m2.DeviceID, m2.PersistentDeviceName, m2.SymlinkPath = &dev, "vol00000002", "/dev/disk/volumed/vol-2"
	m3.CreatedAt = base.Add(-time.Minute)
	m1, m2, m3 = mustPut(t, s, m1), mustPut(t, s, m2), mustPut(t, s, m3)
	got, err := s.GetMapping(ctx, "vol-2")
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, m2)
	if got, err = s.GetMappingByDevice(ctx, "vm-1", "/dev/vdc"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, m2)
	wantDevice(t, s, "vm-2", "/dev/vdc", "")
	for vm, want := range map[string][]string{
		"vm-1": {"vol-1", "vol-2"}, "vm-2": {"vol-3"}, "": {"vol-3", "vol-1", "vol-2"}, "vm-x": {},
	} {
		if got := mappingVolumes(t, s, vm); !slices.Equal(got, want) {
			t.Fatalf("mappings of %q = %v, want %v", vm, got, want)
		}
	}

	m1.LinuxState, m1.UpdatedAt = commands.LinuxMissing, base.Add(time.Hour)
	m1 = mustPut(t, s, m1)
	if got, err = s.GetMapping(ctx, "vol-1"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, got, m1)
	if got := mappingVolumes(t, s, ""); len(got) != 3 {
		t.Fatalf("after replace: %v", got)
	}

	for range 2 { // deleting twice is no error
		if err := s.DeleteMapping(ctx, "vol-2", 0); err != nil {
			t.Fatalf("delete: %v", err)
		}
	}
	if _, err := s.GetMapping(ctx, "vol-2"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	wantDevice(t, s, "vm-1", "/dev/vdc", "")
	wantDevice(t, s, "vm-1", "", "")
	if got := mappingVolumes(t, s, "vm-1"); !slices.Equal(got, []string{"vol-1"}) {
		t.Fatalf("vm-1 after delete: %v", got)
	}
	if got := mappingVolumes(t, s, ""); !slices.Equal(got, []string{"vol-3", "vol-1"}) {
		t.Fatalf("all after delete: %v", got)
	}
	if _, err := s.GetMapping(ctx, "vol-9"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	if err := s.DeleteMapping(ctx, "vol-9", 0); err != nil {
		t.Fatalf("delete unknown: %v", err)
	}
}

func testMappingConflictAndMoves(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	revs := map[string]uint64{} // volume → revision of its mapping
	for _, m := range []commands.Mapping{Mapping("vol-1", "vm-1", "/dev/vdb"), Mapping("vol-3", "vm-2", "/dev/vdd")} {
		revs[m.VolumeID] = mustPut(t, s, m).Revision
	}
	for _, step := range []struct {
		name    string
		put     commands.Mapping
		wantErr error
		devices map[vmDevice]string // device → holder ("" none)
		vms     map[string][]string // vm → volumes
	}{
		{"device held by another volume", Mapping("vol-4", "vm-1", "/dev/vdb"), state.ErrConflict,
			map[vmDevice]string{{"vm-1", "/dev/vdb"}: "vol-1"}, map[string][]string{"vm-1": {"vol-1"}}},
		{"move to a new device frees the old", Mapping("vol-1", "vm-1", "/dev/vde"), nil,
			map[vmDevice]string{{"vm-1", "/dev/vdb"}: "", {"vm-1", "/dev/vde"}: "vol-1"}, map[string][]string{"vm-1": {"vol-1"}}},
		{"the freed device can be taken", Mapping("vol-4", "vm-1", "/dev/vdb"), nil,
			map[vmDevice]string{{"vm-1", "/dev/vdb"}: "vol-4", {"vm-1", "/dev/vde"}: "vol-1"}, map[string][]string{"vm-1": {"vol-1", "vol-4"}}},
		{"move to another vm", Mapping("vol-3", "vm-1", "/dev/vdd"), nil,
			map[vmDevice]string{{"vm-1", "/dev/vdd"}: "vol-3", {"vm-2", "/dev/vdd"}: ""}, map[string][]string{"vm-1": {"vol-3", "vol-1", "vol-4"}, "vm-2": {}}},
		{"same volume, same device", Mapping("vol-3", "vm-1", "/dev/vdd"), nil,
			map[vmDevice]string{{"vm-1", "/dev/vdd"}: "vol-3"}, map[string][]string{"vm-1": {"vol-3", "vol-1", "vol-4"}}},
		{"the same path on another vm is another device", Mapping("vol-6", "vm-2", "/dev/vdb"), nil,
			map[vmDevice]string{{"vm-2", "/dev/vdb"}: "vol-6", {"vm-1", "/dev/vdb"}: "vol-4"}, map[string][]string{"vm-2": {"vol-6"}}},
		{"no device path yet", Mapping("vol-5", "vm-3", ""), nil,
			map[vmDevice]string{{"vm-3", ""}: ""}, map[string][]string{"vm-3": {"vol-5"}}},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.put.VolumeID == "vol-3" {
				step.put.CreatedAt = base.Add(-time.Minute)
			}
			step.put.Revision = revs[step.put.VolumeID]
			got, err := s.PutMapping(ctx, step.put)
			if err == nil {
				revs[step.put.VolumeID] = got.Revision
			}
			if !errors.Is(err, step.wantErr) || (step.wantErr == nil) != (err == nil) {
				t.Fatalf("put %s on %s: %v, want %v", step.put.VolumeID, step.put.DevicePath, err, step.wantErr)
			}
			if err != nil {
				if _, err := s.GetMapping(ctx, step.put.VolumeID); !errors.Is(err, state.ErrNotFound) {
					t.Fatalf("refused mapping was written: %v", err)
				}
			}
			for d, holder := range step.devices {
				wantDevice(t, s, d.vm, d.dev, holder)
			}
			for vm, want := range step.vms {
				if got := mappingVolumes(t, s, vm); !slices.Equal(got, want) {
					t.Fatalf("mappings of %s = %v, want %v", vm, got, want)
				}
			}
		})
	}
}

// Export returns an export record for tests.
func Export(volume string, readOnly bool) commands.Export {
	return commands.Export{VolumeID: volume, VMID: "vm-1", ExportName: "vol" + volume[len(volume)-8:],
		DevicePath: "/dev/disk/by-volume/vol" + volume[len(volume)-8:], ReadOnly: readOnly,
		Status: commands.ExportActive, CreatedAt: base, UpdatedAt: base}
}

// exportVolumes lists the export records and returns their volume ids.
func exportVolumes(t testing.TB, s state.Store) []string {
	t.Helper()
	es, err := s.ListExports(ctxFor(t))
	if err != nil {
		t.Fatalf("list exports: %v", err)
	}
	out := []string{}
	for _, e := range es {
		out = append(out, e.VolumeID)
	}
	return out
}

func testExports(t *testing.T, s state.Store) {
	ctx := ctxFor(t)
	if got := exportVolumes(t, s); len(got) != 0 {
		t.Fatalf("empty store lists exports %v", got)
	}
	e1, e2, e3 := Export(ID(1), true), Export(ID(2), false), Export(ID(3), true)
	all := []string{ID(1), ID(2), ID(3)}
	for _, step := range []struct {
		name   string
		do     func() error
		want   []string         // volumes listed afterwards, in order
		record *commands.Export // GetExport of its volume must give this
		gone   string           // GetExport of this volume must be ErrNotFound
	}{
		{"put three, listed by volume", func() error {
			var err3, err1, err2 error
			e3, err3 = s.PutExport(ctx, e3)
			e1, err1 = s.PutExport(ctx, e1)
			e2, err2 = s.PutExport(ctx, e2)
			return errors.Join(err3, err1, err2)
		}, all, &e2, ID(9)},
		{"replace keeps one record", func() error {
			e2.ReadOnly, e2.UpdatedAt = true, base.Add(time.Hour)
			var err error
			e2, err = s.PutExport(ctx, e2)
			return err
		}, all, &e2, ""},
		{"delete", func() error { return s.DeleteExport(ctx, ID(2), e2.Revision) }, []string{ID(1), ID(3)}, &e1, ID(2)},
		{"delete again is no error", func() error { return s.DeleteExport(ctx, ID(2), e2.Revision) }, []string{ID(1), ID(3)}, &e3, ID(2)},
		{"delete unknown is no error", func() error { return s.DeleteExport(ctx, ID(8), 0) }, []string{ID(1), ID(3)}, &e3, ID(8)},
		{"put again after delete", func() error {
			e2.Revision = 0
			var err error
			e2, err = s.PutExport(ctx, e2)
			return err
		}, all, &e2, ""},
		{"no volume id is refused", func() error {
			if _, err := s.PutExport(ctx, commands.Export{ExportName: "vol00000000"}); err == nil {
				return errors.New("export without volume id accepted")
			}
			return nil
		}, all, nil, ""},
	} {
		t.Run(step.name, func(t *testing.T) {
			if err := step.do(); err != nil {
				t.Fatal(err)
			}
			if got := exportVolumes(t, s); !slices.Equal(got, step.want) {
				t.Fatalf("exports %v, want %v", got, step.want)
			}
			if step.record != nil {
				got, err := s.GetExport(ctx, step.record.VolumeID)
				if err != nil {
					t.Fatal(err)
				}
				sameJSON(t, got, *step.record)
				if got.Revision != step.record.Revision {
					t.Fatalf("export revision %d, the write returned %d", got.Revision, step.record.Revision)
				}
			}
			if step.gone != "" {
				if got, err := s.GetExport(ctx, step.gone); !errors.Is(err, state.ErrNotFound) {
					t.Fatalf("export of %s: %+v, %v; want ErrNotFound", step.gone, got, err)
				}
			}
		})
	}
}

func testConcurrentWriters(t *testing.T, s state.Store) {
	const n = 50
	ctx := ctxFor(t)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	var dur time.Duration
	byType := map[commands.OpType]int64{}
	for i := range n {
		typ := commands.OpTypes[i%len(commands.OpTypes)]
		byType[typ]++
		dur += time.Duration(i+1) * time.Millisecond
		wg.Go(func() {
			op, err := s.CreateOperation(ctx, Op(i+1, typ, commands.StatusPending, fmt.Sprintf("vol-%d", i%5), "", base.Add(time.Duration(i)*time.Microsecond)))
			if err != nil {
				errs <- err
				return
			}
			op.Status = commands.StatusExecuting
			if op, err = s.UpdateOperation(ctx, op); err != nil {
				errs <- err
				return
			}
			done := op.CreatedAt.Add(time.Duration(i+1) * time.Millisecond)
			op.Status, op.CompletedAt = commands.StatusCompleted, &done
			_, err = s.UpdateOperation(ctx, op)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := ListIDs(t, s, state.Filter{Status: commands.StatusCompleted}); len(got) != n {
		t.Fatalf("%d completed, want %d", len(got), n)
	}
	if got := ListIDs(t, s, state.Filter{VolumeID: "vol-3"}); len(got) != n/5 {
		t.Fatalf("%d on vol-3, want %d", len(got), n/5)
	}
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		if got := ListIDs(t, s, state.Filter{Status: st}); len(got) != 0 {
			t.Fatalf("left %s: %v", st, got)
		}
	}
	wantStats(t, s, n, n, dur, byType, map[commands.OpStatus]int64{commands.StatusCompleted: n})
}

func testPingClose(t *testing.T, s state.Store) {
	if err := s.Ping(ctxFor(t)); err != nil {
		t.Fatalf("ping: %v", err)
	}
	for i := range 2 {
		if err := s.Close(ctxFor(t)); err != nil {
			t.Fatalf("close #%d: %v", i+1, err)
		}
	}
}

// Bench runs the benchmarks: writes, and a filtered listing with limit 10
// over 10,000 operations, and the prune.
func Bench(b *testing.B, open Open) {
	ctx := context.Background()
	b.Run("CreateOperation", func(b *testing.B) {
		s := open(b)
		for i := 0; b.Loop(); i++ {
			if _, err := s.CreateOperation(ctx, Op(i, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", base)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("UpdateOperation", func(b *testing.B) {
		s := open(b)
		ops := make([]commands.Operation, 100)
		for i := range ops {
			ops[i] = mustCreate(b, s, Op(i, commands.OpAttach, commands.StatusExecuting, "vol-1", "vm-1", base))[0]
		}
		for i := 0; b.Loop(); i++ {
			op := &ops[i%len(ops)]
			op.Attempts++ // a compare-and-swap on the revision the last update returned
			next, err := s.UpdateOperation(ctx, *op)
			if err != nil {
				b.Fatal(err)
			}
			*op = next
		}
	})
	s := open(b)
	seed(b, s, 10_000)
	for _, f := range []state.Filter{
		{Type: commands.OpAttach, Limit: 10},
		{Type: commands.OpAttach, Status: commands.StatusCompleted, Limit: 10},
		{VolumeID: "vol-7", Limit: 10},
	} {
		b.Run("ListOperations/"+filterName(f), func(b *testing.B) {
			for b.Loop() {
				ops, _, err := s.ListOperations(ctx, f)
				if err != nil || len(ops) != 10 {
					b.Fatalf("list: %d, %v", len(ops), err)
				}
			}
		})
	}
	// A retention pass's call with nothing due: none held, then 50 test
	// failovers held (read again at each call).
	cut := base.Add(-time.Hour)
	for _, held := range []int{0, 50} {
		for i := range held {
			if _, err := s.CreateOperation(ctx, Failover(20_000+i, commands.StatusCompleted, fmt.Sprintf("vol-h%d", i), true,
				cut.Add(-time.Hour))); err != nil {
				b.Fatal(err)
			}
		}
		if n, err := s.PruneOperations(ctx, cut, 500); err != nil || n != 0 {
			b.Fatalf("prune: %d, %v", n, err)
		}
		b.Run(fmt.Sprintf("PruneOperations/held%d", held), func(b *testing.B) {
			for b.Loop() {
				if n, err := s.PruneOperations(ctx, cut, 500); err != nil || n != 0 {
					b.Fatalf("prune: %d, %v", n, err)
				}
			}
		})
	}
}

func filterName(f state.Filter) string {
	parts := map[string]string{"type": string(f.Type), "status": string(f.Status), "volume": f.VolumeID}
	var out []string
	for _, k := range slices.Sorted(maps.Keys(parts)) {
		if parts[k] != "" {
			out = append(out, k)
		}
	}
	return strings.Join(out, "+") + fmt.Sprintf("/limit%d", f.Limit)
}

// seed creates n operations spread over every type, status, 100 volumes
// and 20 VMs, from 4 writers.
func seed(b *testing.B, s state.Store, n int) {
	const writers = 4
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := w; i < n; i += writers {
				op := Op(i, commands.OpTypes[i%len(commands.OpTypes)], commands.OpStatuses[i%3*2%len(commands.OpStatuses)],
					fmt.Sprintf("vol-%d", i%100), fmt.Sprintf("vm-%d", i%20), base.Add(time.Duration(i)*time.Millisecond))
				if _, err := s.CreateOperation(context.Background(), op); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// MemoryOps is how many operations MeasureMemory records.
const MemoryOps = 100_000

// MeasureMemory reports what MemoryOps operations cost the store, as used
// reports it (the process heap, the server's memory): recorded, and again
// after PruneOperations removed them all. The operations look like the
// ones volumed records: completed attaches with their request, response,
// step and job id.
func MeasureMemory(b *testing.B, s state.Store, used func() int64) {
	ctx := context.Background()
	before := used()
	const writers = 4
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := w; i < MemoryOps; i += writers {
				vol, vm := fmt.Sprintf("4e5c3f2a-1b0d-4c8e-9f7a-%012d", i%5000), fmt.Sprintf("87654321-4321-4321-4321-%012d", i%50)
				created := base.Add(time.Duration(i) * time.Millisecond)
				done := created.Add(3 * time.Second)
				dev := int64(1 + i%14)
				op := commands.Operation{ID: fmt.Sprintf("op-%08x-7d4e-4b1a-9c3f-2a1b0c9d8e7f", i), Type: commands.OpAttach,
					Status: commands.StatusCompleted, VolumeID: vol, VMID: &vm,
					Request:  json.RawMessage(fmt.Sprintf(`{"volume_id":%q,"vm_id":%q}`, vol, vm)),
					Response: &commands.OpResponse{VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb", DeviceID: &dev, Message: "Volume attached successfully"},
					Step:     "attach:correlate", JobID: fmt.Sprintf("a1b2c3d4-%04d-4e5f-8a9b-0c1d2e3f4a5b", i%10000), Attempts: 1,
					CreatedAt: created, UpdatedAt: done, CompletedAt: &done}
				if _, err := s.CreateOperation(ctx, op); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if b.Failed() {
		return
	}
	filled := used()
	n, err := s.PruneOperations(ctx, time.Now(), 0)
	if err != nil || n != MemoryOps {
		b.Fatalf("pruned %d, %v", n, err)
	}
	pruned := used()
	b.ReportMetric(float64(filled-before), "B/100k-ops")
	b.ReportMetric(float64(pruned-before), "B-after-prune")
	b.Logf("%d operations: %.1f MiB (%d B each); after pruning them all: %+.1f MiB",
		MemoryOps, float64(filled-before)/(1<<20), (filled-before)/MemoryOps, float64(pruned-before)/(1<<20))
}
