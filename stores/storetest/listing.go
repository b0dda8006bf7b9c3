package storetest

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Gap makes every later listing of s call fn between its read of the
// index (the ids of a page) and its read of their records, and read
// those records from the backend, not from a copy it kept of what it
// indexed. The suite calls it once the operations a test lists are
// created.
type Gap func(s state.Store, fn func())

// RunListing checks that a listing walked page by page with the cursors
// a store hands out returns every matching operation exactly once, when
// the records of a page are left out (deleted after the index was read,
// corrupt, moved out of the filter) and while operations change status.
// A store that reads a page's index and records at once has no gap
// (nil), and one that keeps no corrupt record no spoil (nil): it runs
// what remains.
func RunListing(t *testing.T, open Open, gap Gap, spoil Spoil) {
	t.Run("left out", func(t *testing.T) {
		if gap == nil {
			t.Skip("the store reads a page's index and records at once")
		}
		testLeftOut(t, open, gap, spoil)
	})
	t.Run("first past left out", func(t *testing.T) {
		if gap == nil {
			t.Skip("the store reads a page's index and records at once")
		}
		testFirstPastLeftOut(t, open, gap, spoil)
	})
	t.Run("walk while moving/between index and records", func(t *testing.T) {
		if gap == nil {
			t.Skip("the store reads a page's index and records at once")
		}
		testWalkWhileMoving(t, open, gap)
	})
	t.Run("walk while moving/meanwhile", func(t *testing.T) { testWalkWhileMoving(t, open, nil) })
}

// leaveOut takes op out of a listing of executing operations: deletes
// it, moves it to completed or spoils its record.
type leaveOut func(ctx context.Context, s state.Store, spoil Spoil, op commands.Operation) error

func deleteOp(ctx context.Context, s state.Store, _ Spoil, op commands.Operation) error {
	return s.DeleteOperation(ctx, op.ID, op.Revision)
}

func completeOp(ctx context.Context, s state.Store, _ Spoil, op commands.Operation) error {
	done := op.CreatedAt.Add(time.Minute)
	op.Status, op.UpdatedAt, op.CompletedAt = commands.StatusCompleted, done, &done
	_, err := s.UpdateOperation(ctx, op)
	return err
}

func spoilOp(ctx context.Context, _ state.Store, spoil Spoil, op commands.Operation) error {
	spoil(ctx, "operation", op.ID, []byte("{not json"))
	return nil
}

// testLeftOut: the records of the first page of executing operations
// are left out between the store's read of its index and of the
// records. The page still names the next one, which starts after the
// last id the first covered, and the walk returns every other
// executing operation once, in full pages.
func testLeftOut(t *testing.T, open Open, gap Gap, spoil Spoil) {
	const n, limit = 7, 2
	for _, tc := range []struct {
		name    string
		leave   leaveOut
		at      []int // the positions in the first page left out
		spoiled bool  // leave spoils records
	}{
		{"deleted after indexing, whole page", deleteOp, []int{0, 1}, false},
		{"moved out of the filter, whole page", completeOp, []int{0, 1}, false},
		{"corrupt, whole page", spoilOp, []int{0, 1}, true},
		{"deleted after indexing, last of the page", deleteOp, []int{1}, false},
		{"moved out of the filter, last of the page", completeOp, []int{1}, false},
		{"corrupt, last of the page", spoilOp, []int{1}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.spoiled && spoil == nil {
				t.Skip("the store keeps no corrupt record")
			}
			s, ctx := open(t), ctxFor(t)
			var ops []commands.Operation
			for i := 1; i <= n; i++ {
				ops = append(ops, Op(i, commands.OpAttach, commands.StatusExecuting, ID(i), "vm-1", base.Add(time.Duration(i)*time.Second)))
			}
			ops = mustCreate(t, s, ops...)
			slices.Reverse(ops) // newest first, as listed
			var want []string
			for i, op := range ops {
				if !slices.Contains(tc.at, i) {
					want = append(want, op.ID)
				}
			}
			first := true
			gap(s, func() {
				if first {
					first = false
					for _, i := range tc.at {
						if err := tc.leave(ctx, s, spoil, ops[i]); err != nil {
							t.Fatalf("leave %s out: %v", ops[i].ID, err)
						}
					}
				}
			})
			f := state.Filter{Status: commands.StatusExecuting, Limit: limit}
			var got []string
			for page := 0; ; page++ {
				rows, next, err := s.ListOperations(ctx, f)
				if err != nil {
					t.Fatalf("page %d: %v", page, err)
				}
				got = append(got, IDs(rows)...)
				if page == 0 && next == "" {
					t.Fatalf("first page %v: no next page, %d executing operations follow", IDs(rows), n-limit)
				}
				if next == "" {
					break
				}
				if page > 0 && len(rows) != limit {
					t.Fatalf("page %d: %v and a next page: a page after the changes is full (%d)", page, IDs(rows), limit)
				}
				if page > n {
					t.Fatalf("no end after %d pages", page)
				}
				f.Cursor = next
			}
			if !slices.Equal(got, want) {
				t.Fatalf("walk returned %v, want %v", got, want)
			}
		})
	}
}

// testFirstPastLeftOut: state.FirstOperation of the executing
// operations, when the newest one's record is left out between the
// store's read of its index and of the record, is the one after it; when
// every record is left out, it ends and finds none.
func testFirstPastLeftOut(t *testing.T, open Open, gap Gap, spoil Spoil) {
	for _, tc := range []struct {
		name    string
		leave   leaveOut
		spoiled bool
		all     bool // leave both operations out, not only the newest
	}{
		{"deleted after indexing", deleteOp, false, false},
		{"moved out of the filter", completeOp, false, false},
		{"corrupt", spoilOp, true, false},
		{"every one deleted after indexing", deleteOp, false, true},
		{"every one moved out of the filter", completeOp, false, true},
		{"every one corrupt", spoilOp, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.spoiled && spoil == nil {
				t.Skip("the store keeps no corrupt record")
			}
			s, ctx := open(t), ctxFor(t)
			ops := mustCreate(t, s,
				Op(1, commands.OpAttach, commands.StatusExecuting, ID(1), "vm-1", base),
				Op(2, commands.OpAttach, commands.StatusExecuting, ID(2), "vm-1", base.Add(time.Second)))
			leave := ops[1:]
			if tc.all {
				leave = ops
			}
			first := true
			gap(s, func() {
				if first {
					first = false
					for _, op := range leave {
						if err := tc.leave(ctx, s, spoil, op); err != nil {
							t.Fatalf("leave %s out: %v", op.ID, err)
						}
					}
				}
			})
			got, ok, err := state.FirstOperation(ctx, s, state.Filter{Status: commands.StatusExecuting})
			switch {
			case err != nil:
				t.Fatalf("first executing operation: %v", err)
			case tc.all && ok:
				t.Fatalf("first executing operation: %s, want none", got.ID)
			case !tc.all && (!ok || got.ID != ops[0].ID):
				t.Fatalf("first executing operation: %s, %v; want %s", got.ID, ok, ops[0].ID)
			}
		})
	}
}

// testWalkWhileMoving: of 40 executing operations, one in four stays
// executing, the others move to completed, newest first, while a
// listing of the executing ones is walked, 3 a page. Runs of three
// movers fill whole pages. With a gap, the next three movers move
// between each page's read of its index and of its records, so the
// first page's records are all left out; without (nil), a goroutine
// moves them meanwhile.
// The walk returns each operation at most once, in order, each
// executing when read, and every one that stayed.
func testWalkWhileMoving(t *testing.T, open Open, gap Gap) {
	const n, limit = 40, 3
	s, ctx := open(t), ctxFor(t)
	var ops []commands.Operation
	for i := 1; i <= n; i++ {
		ops = append(ops, Op(i, commands.OpDetach, commands.StatusExecuting, ID(i), "vm-1", base.Add(time.Duration(i)*time.Second)))
	}
	ops = mustCreate(t, s, ops...)
	slices.Reverse(ops) // newest first: 40, 39, 38 move, 37 stays, …
	var stay, movers []commands.Operation
	for i, op := range ops {
		if i%4 == 3 {
			stay = append(stay, op)
		} else {
			movers = append(movers, op)
		}
	}
	var mu sync.Mutex
	moveNext := func(k int) bool {
		mu.Lock()
		defer mu.Unlock()
		for ; k > 0 && len(movers) > 0; k-- {
			if err := completeOp(ctx, s, nil, movers[0]); err != nil {
				t.Errorf("complete %s: %v", movers[0].ID, err)
			}
			movers = movers[1:]
		}
		return len(movers) > 0
	}
	if gap != nil {
		gap(s, func() { moveNext(limit) })
	} else {
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			for moveNext(1) {
			}
		})
	}
	f := state.Filter{Status: commands.StatusExecuting, Limit: limit}
	var got []commands.Operation
	for page := 0; ; page++ {
		rows, next, err := s.ListOperations(ctx, f)
		if err != nil {
			t.Fatalf("page %d: %v", page, err)
		}
		if len(rows) > limit {
			t.Fatalf("page %d: %d rows, limit %d", page, len(rows), limit)
		}
		got = append(got, rows...)
		if next == "" {
			break
		}
		if page > n {
			t.Fatalf("no end after %d pages", page)
		}
		f.Cursor = next
	}
	ids := IDs(got)
	for i, op := range got {
		if op.Status != commands.StatusExecuting {
			t.Fatalf("listed %s %s, want executing", op.ID, op.Status)
		}
		if i > 0 && state.CompareNewestFirst(got[i-1], op) >= 0 {
			t.Fatalf("walk out of order or twice: %v", ids)
		}
	}
	for _, op := range stay {
		if !slices.Contains(ids, op.ID) {
			t.Fatalf("walk returned %v: %s stayed executing and is missing", ids, op.ID)
		}
	}
}
