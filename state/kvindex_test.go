package state

import (
	"fmt"
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
