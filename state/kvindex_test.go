package state

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// TestOpIndexDeferred: an index whose lists and counters are made at the
// end (a start reading every record) is the index kept up to date at
// each write: the same lists in the same order, counters and interned
// strings, whatever the writes (new operations, moves, deletes, ids of
// every form created at the same instants, records without a status),
// and it is kept up to date from then on.
func TestOpIndexDeferred(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	var ids []string
	for n := range 400 {
		if n%4 == 0 {
			ids = append(ids, fmt.Sprintf("op-%d", rng.IntN(1000)))
		} else {
			ids = append(ids, fmt.Sprintf("op-%08x-0000-4000-8000-%012x", rng.Uint32(), n))
		}
	}
	live, deferred := newOpIndex(), newOpIndex()
	deferred.grow(100)
	deferred.deferred = true
	write := func(rev uint64) {
		id := ids[rng.IntN(len(ids))]
		if rng.IntN(8) == 0 {
			live.remove(id)
			deferred.remove(id)
			return
		}
		st := commands.OpStatuses[rng.IntN(len(commands.OpStatuses))]
		if rng.IntN(50) == 0 {
			st = "" // a record written by hand: no live operation
		}
		created := base.Add(time.Duration(rng.IntN(30)) * time.Second)
		vm := fmt.Sprintf("vm-%d", rng.IntN(4))
		op := commands.Operation{ID: id, Type: commands.OpTypes[rng.IntN(len(commands.OpTypes))], Status: st,
			VolumeID: fmt.Sprintf("vol-%d", rng.IntN(6)), RequestedBy: fmt.Sprintf("u%d", rng.IntN(3)),
			CreatedAt: created, UpdatedAt: created.Add(time.Second)}
		if rng.IntN(2) == 0 {
			op.VMID = &vm
		}
		if st.Terminal() && rng.IntN(2) == 0 {
			done := created.Add(time.Duration(rng.IntN(90)) * time.Second)
			op.CompletedAt = &done
		}
		live.put(rev, &op)
		// As the watcher puts what the scanner read: the strings as
		// pieces of a record.
		f := fieldsOf(&op)
		b := opFields[[]byte]{typ: []byte(f.typ), status: []byte(f.status), volume: []byte(f.volume), vm: []byte(f.vm),
			by: []byte(f.by), created: f.created, completed: f.completed, duration: f.duration}
		if !putNewer(deferred, id, rev, &b) || putNewer(deferred, id, rev, &b) {
			t.Fatalf("revision %d of %s: put once", rev, id)
		}
	}
	rev := uint64(0)
	for range 3000 {
		rev++
		write(rev)
	}
	if len(deferred.lists) != 0 || deferred.stats.Total != 0 {
		t.Fatalf("deferred: %d lists, %d counted", len(deferred.lists), deferred.stats.Total)
	}
	deferred.endDeferred()
	same := func(when string) {
		t.Helper()
		if !reflect.DeepEqual(live.lists, deferred.lists) {
			t.Fatalf("%s: lists differ:\n%v\n%v", when, live.lists, deferred.lists)
		}
		if !reflect.DeepEqual(live.stats, deferred.stats) || !reflect.DeepEqual(live.names, deferred.names) ||
			!reflect.DeepEqual(live.kinds, deferred.kinds) || !reflect.DeepEqual(live.wide, deferred.wide) ||
			!reflect.DeepEqual(live.slots, deferred.slots) {
			t.Fatalf("%s: stats, names or slots differ: %+v, %+v", when, live.stats, deferred.stats)
		}
	}
	same("made at the end")
	for range 500 {
		rev++
		write(rev)
	}
	same("kept up to date after")
}

// TestOpIndexExactTimes: the index gives back exactly the times it was
// given (the completion's score and the duration to the nanosecond),
// whether they fit in the slot or not, and the types and statuses of
// the 255th kind and beyond; so do its counters and its cache encoding,
// and nothing of a wide slot is left once it fits again or is removed.
func TestOpIndexExactTimes(t *testing.T) {
	base := time.Date(2026, 12, 1, 0, 0, 0, 123456789, time.UTC)
	at := func(d time.Duration) *time.Time { v := base.Add(d); return &v }
	y3000 := base.AddDate(974, 0, 0)
	y3000done := y3000.Add(time.Second + 1)
	for _, tc := range []struct {
		name      string
		status    commands.OpStatus
		created   time.Time
		completed *time.Time // CompletedAt
		updated   time.Duration
		typ       commands.OpType
		wide      bool
	}{
		{"seconds later", commands.StatusCompleted, base, at(3*time.Second + 789), 0, commands.OpAttach, false},
		{"within its microsecond", commands.StatusFailed, base, at(1), 0, commands.OpAttach, false},
		{"71 minutes later", commands.StatusCompleted, base, at(71 * time.Minute), 0, commands.OpAttach, false},
		{"72 minutes later", commands.StatusCompleted, base, at(72*time.Minute + 1), 0, commands.OpAttach, true},
		{"completed before created (clocks)", commands.StatusCancelled, base, at(-2 * time.Millisecond), 0, commands.OpAttach, true},
		{"terminal without CompletedAt", commands.StatusFailed, base, nil, 5 * time.Second, commands.OpAttach, false},
		{"terminal without CompletedAt, updated days later", commands.StatusFailed, base, nil, 50 * time.Hour, commands.OpAttach, true},
		{"not terminal, with CompletedAt", commands.StatusExecuting, base, at(time.Second), 0, commands.OpAttach, true},
		{"not terminal", commands.StatusPending, base, nil, time.Second, commands.OpAttach, false},
		{"created at the zero time", commands.StatusCompleted, time.Time{}, at(0), 0, commands.OpAttach, true},
		{"in the year 3000", commands.StatusCompleted, y3000, &y3000done, 0, commands.OpAttach, false},
		{"the 300th type", commands.StatusCompleted, base, at(time.Second), 0, "type-300", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := newOpIndex()
			op := commands.Operation{ID: "op-00000000-0000-4000-8000-000000000001", Type: tc.typ, Status: tc.status,
				VolumeID: "vol-1", CreatedAt: tc.created, UpdatedAt: base.Add(tc.updated), CompletedAt: tc.completed}
			if tc.typ == commands.OpAttach {
				x.put(1000, &op) // its type and status numbered first
			}
			// Kinds enough that a kind numbered last is past a byte.
			for n := range 300 {
				op := commands.Operation{ID: fmt.Sprintf("op-filler-%d", n), Type: commands.OpType(fmt.Sprintf("type-%d", n)),
					Status: commands.StatusCompleted, CreatedAt: base.Add(-time.Hour), CompletedAt: at(-time.Hour + time.Second)}
				x.put(uint64(n+1), &op)
			}
			x.put(1000, &op)
			check := func(x *opIndex, when string) {
				t.Helper()
				i, ok := x.byID.get(x, op.ID)
				if !ok {
					t.Fatalf("%s: not found", when)
				}
				_, wantCompleted, wantDuration := opTimes(&op)
				completed, duration := x.times(i)
				typ, status := x.kindsOf(i)
				if completed != wantCompleted || duration != wantDuration || x.kinds.str(typ) != string(op.Type) ||
					x.kinds.str(status) != string(op.Status) {
					t.Fatalf("%s: completed %d, duration %v, %s %s; want %d, %v, %s %s", when, completed, duration,
						x.kinds.str(typ), x.kinds.str(status), wantCompleted, wantDuration, op.Type, op.Status)
				}
				if wide := x.slots[i].flags&slotWide != 0; when == "put" && wide != tc.wide {
					t.Fatalf("%s: wide %v, want %v", when, wide, tc.wide)
				}
				var want time.Duration
				if op.Status.Terminal() {
					want = op.Duration() + 300*time.Second
				} else {
					want = 300 * time.Second
				}
				if x.stats.TerminalDuration != want || x.stats.ByType[op.Type] != 1 || x.stats.ByStatus[op.Status] < 1 {
					t.Fatalf("%s: stats %+v, want duration %v", when, x.stats, want)
				}
				for _, f := range []Filter{{Type: op.Type}, {Status: op.Status, VolumeID: "vol-1"}} {
					if ids, _, _ := x.list(f, nil, 0); len(ids) != 1 || ids[0] != op.ID {
						t.Fatalf("%s: list %+v: %v", when, f, ids)
					}
				}
			}
			check(x, "put")
			var buf bytes.Buffer
			w := bufio.NewWriter(&buf)
			x.encode(&cacheEncoder{w: w}, 1000)
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			r := &io.LimitedReader{R: &buf, N: int64(buf.Len())}
			y, err := decodeOpIndex(&cacheDecoder{r: bufio.NewReader(r), left: r}, &kvCache{})
			if err != nil {
				t.Fatal(err)
			}
			check(y, "loaded")
			for _, x := range []*opIndex{x, y} {
				done := op
				done.Type, done.Status, done.CreatedAt, done.CompletedAt = "type-0", commands.StatusCompleted, base, at(time.Second)
				x.put(1001, &done)
				if i, _ := x.byID.get(x, op.ID); x.slots[i].flags&slotWide != 0 {
					t.Fatal("a slot that fits again is still wide")
				}
				for n := range 300 {
					x.remove(fmt.Sprintf("op-filler-%d", n))
				}
				x.remove(op.ID)
				if len(x.wide) != 0 || len(x.kinds.ids) != 0 || len(x.names.ids) != 0 || len(x.lists) != 0 || x.len() != 0 {
					t.Fatalf("left: %d wide, %d kinds, %d names, %d lists, %d operations", len(x.wide), len(x.kinds.ids),
						len(x.names.ids), len(x.lists), x.len())
				}
			}
		})
	}
}
