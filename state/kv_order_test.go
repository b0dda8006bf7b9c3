package state

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// TestKVApplyOrder drives the in-memory indexes through the interleavings
// of a process's own writes with its watcher that real timing produces
// only rarely: a write applied after the watcher has delivered it and a
// later delete must not bring the record back, and the watcher must not
// undo a newer write of the process.
func TestKVApplyOrder(t *testing.T) {
	op := commands.Operation{ID: "op-1", Type: commands.OpAttach, Status: commands.StatusExecuting, VolumeID: "vol-1",
		CreatedAt: time.Unix(1, 0)}
	raw, err := json.Marshal(op)
	if err != nil {
		t.Fatal(err)
	}
	type apply struct {
		rev     uint64
		deleted bool
		watcher bool
	}
	for _, tc := range []struct {
		name   string
		steps  []apply
		listed bool
	}{
		{"own write after the watcher delivered it and a delete", []apply{{7, false, true}, {9, true, true}, {7, false, false}}, false},
		{"own write before the watcher", []apply{{7, false, false}, {7, false, true}}, true},
		{"watcher behind an own newer write", []apply{{7, false, false}, {5, false, true}}, true},
		{"own write, then the watcher delivers a delete", []apply{{7, false, false}, {9, true, true}}, false},
		{"delete delivered before an older own write returns", []apply{{9, true, true}, {8, false, false}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &KV{ops: newOpLayers(), recent: newRecentOps(4)}
			for _, st := range tc.steps {
				data := raw
				if st.deleted {
					data = nil
				}
				var err error
				switch {
				case st.watcher:
					err = k.applyWatchedOp(op.ID, st.rev, data, true)
				case st.deleted:
					err = k.applyOpValue(op.ID, st.rev, nil, nil, false)
				default:
					err = k.applyOpValue(op.ID, st.rev, &op, data, false)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			_, _, listed := k.ops.rev(op.ID)
			if n := len(k.ops.delta.lists["status:"+string(op.Status)]); listed != tc.listed || (n == 1) != tc.listed || k.ops.stats().Total != int64(n) {
				t.Fatalf("entry %v, indexed %d, total %d; want listed %v", listed, n, k.ops.stats().Total, tc.listed)
			}
		})
	}
}

// TestKVApplySkipsWhatItHolds: the watcher's copy of a revision the
// indexes already hold (this process's own write) is not applied again,
// and need not decode; a revision they do not hold must.
func TestKVApplySkipsWhatItHolds(t *testing.T) {
	op := commands.Operation{ID: "op-1", Type: commands.OpCreate, Status: commands.StatusPending, CreatedAt: time.Unix(1, 0)}
	k := &KV{ops: newOpLayers(), recent: newRecentOps(4)}
	if err := k.applyOpValue(op.ID, 7, &op, nil, false); err != nil {
		t.Fatal(err)
	}
	undecodable := []byte("{not json")
	if err := k.applyWatchedOp(op.ID, 7, undecodable, true); err != nil || k.seen != 7 {
		t.Fatalf("watcher's copy of a held revision: err %v, seen %d", err, k.seen)
	}
	if err := k.applyWatchedOp(op.ID, 8, undecodable, true); err == nil {
		t.Fatal("a revision the indexes do not hold was not decoded")
	}
	if rev, st, live := k.ops.rev(op.ID); rev != 7 || st != op.Status || !live {
		t.Fatalf("entry at revision %d: %s, live %v", rev, st, live)
	}
}

// TestOpIndexForgets: once every operation is deleted, the index holds no
// list, no interned value and no count, whichever way each went (a
// delete the watcher delivered, or this process's own delete first).
func TestOpIndexForgets(t *testing.T) {
	x := newOpIndex()
	for i := range 100 {
		vm := fmt.Sprintf("vm-%d", i)
		op := commands.Operation{ID: fmt.Sprintf("op-%d", i), Type: commands.OpAttach, Status: commands.StatusExecuting,
			VolumeID: fmt.Sprintf("vol-%d", i), VMID: &vm, RequestedBy: fmt.Sprintf("nats:%d", i), CreatedAt: time.Unix(int64(i), 0)}
		x.put(uint64(2*i+1), &op)
		done := op.CreatedAt.Add(time.Second)
		op.Status, op.CompletedAt = commands.StatusCompleted, &done
		x.put(uint64(2*i+2), &op) // moves its status
	}
	if x.len() != 100 || len(x.lists["status:completed"]) != 100 || len(x.lists["status:executing"]) != 0 {
		t.Fatalf("%d operations, %d completed, %d executing", x.len(), len(x.lists["status:completed"]), len(x.lists["status:executing"]))
	}
	for i := range 100 {
		id := fmt.Sprintf("op-%d", i)
		if i%2 == 0 {
			x.tombstone(id, uint64(2*i+2))
		}
		x.remove(id)
	}
	if x.len() != 0 || len(x.lists) != 0 || len(x.names.ids) != 0 || x.byID.len() != 0 || x.stats.Terminal != 0 || x.stats.TerminalDuration != 0 {
		t.Fatalf("left: %d operations, %d lists, %d names, %d ids, stats %+v", x.len(), len(x.lists), len(x.names.ids), x.byID.len(), x.stats)
	}
}

// TestRecentOps: the recent records keep the last ones put, each only at
// the revision put; an id put again outlives the eviction of its older
// revision.
func TestRecentOps(t *testing.T) {
	r := newRecentOps(3)
	r.put("a", 1, []byte("a1"))
	r.put("b", 2, []byte("b2"))
	r.put("a", 3, []byte("a3")) // a again: its revision 1 is the oldest entry
	r.put("c", 4, []byte("c4")) // evicts a@1, which a@3 replaced: a stays
	if raw, ok := r.get("a", 3); !ok || string(raw) != "a3" {
		t.Fatalf("a at 3: %q, %v", raw, ok)
	}
	if _, ok := r.get("a", 1); ok {
		t.Fatal("a at an older revision")
	}
	r.put("d", 5, []byte("d5")) // evicts b
	if _, ok := r.get("b", 2); ok {
		t.Fatal("b kept past the capacity")
	}
	r.forget("c")
	if _, ok := r.get("c", 4); ok {
		t.Fatal("c kept after forget")
	}
	if len(r.byID) != 2 {
		t.Fatalf("%d kept, want a and d", len(r.byID))
	}
}
