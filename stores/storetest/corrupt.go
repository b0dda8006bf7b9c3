package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Spoil overwrites the stored JSON of the record of id of kind
// ("mapping", "export" or "operation") with raw, behind the store's back.
type Spoil func(ctx context.Context, kind, id string, raw []byte)

// RunCorrupt checks what a store does with a record that is not a record
// of its kind: a read by key is state.ErrCorrupt naming the id, never a
// zero record; a listing skips it without failing; a compare-and-swap
// write on the revision the read returned replaces it.
func RunCorrupt(t *testing.T, open Open, spoil Spoil) {
	t.Run("empty id", func(t *testing.T) {
		// The read of a record that lost its id (an export of an empty
		// mapping) is not found, not a key the store refuses.
		s, ctx := open(t), ctxFor(t)
		_, merr := s.GetMapping(ctx, "")
		_, eerr := s.GetExport(ctx, "")
		_, oerr := s.GetOperation(ctx, "")
		for _, err := range []error{merr, eerr, oerr} {
			if !errors.Is(err, state.ErrNotFound) {
				t.Fatalf("read with an empty id: %v, want not found", err)
			}
		}
	})
	t.Run("write refuses what a read calls corrupt", func(t *testing.T) {
		// A record without a VM would be written, then read as corrupt
		// and left out of every listing.
		s, ctx := open(t), ctxFor(t)
		m := Mapping(ID(1), "", "")
		if _, err := s.PutMapping(ctx, m); err == nil {
			t.Fatal("mapping without vm_id accepted")
		}
		if _, err := s.PutExport(ctx, commands.Export{VolumeID: ID(1), ExportName: "vol00000001"}); err == nil {
			t.Fatal("export without vm_id accepted")
		}
		if _, err := s.GetMapping(ctx, ID(1)); !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("mapping after a refused write: %v, want not found", err)
		}
		if _, err := s.GetExport(ctx, ID(1)); !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("export after a refused write: %v, want not found", err)
		}
	})
	t.Run("prune passes a corrupt operation", func(t *testing.T) {
		// The oldest ended operation's record (a failover's, which the
		// retention reads) holds another's: the retention still prunes
		// the others, every time.
		s, ctx := open(t), ctxFor(t)
		var ops []commands.Operation
		for i := range 3 {
			op := Op(i+1, []commands.OpType{commands.OpFailover, commands.OpAttach, commands.OpFailover}[i], commands.StatusCompleted, ID(1), "vm-1", base.Add(time.Duration(i)*time.Second))
			done := base.Add(time.Duration(i) * time.Minute)
			op.CompletedAt = &done
			ops = append(ops, op)
		}
		mustCreate(t, s, ops...)
		other := ops[2]
		other.ID = ID(9)
		data, err := json.Marshal(other)
		if err != nil {
			t.Fatal(err)
		}
		spoil(ctx, "operation", ops[0].ID, data)
		for _, limit := range []int{1, 1, 0} {
			if _, err := s.PruneOperations(ctx, base.Add(time.Hour), limit); err != nil {
				t.Fatalf("prune (limit %d) over a corrupt operation: %v", limit, err)
			}
		}
		for _, op := range ops[1:] {
			if _, err := s.GetOperation(ctx, op.ID); !errors.Is(err, state.ErrNotFound) {
				t.Fatalf("operation %s after the prune: %v, want pruned", op.ID, err)
			}
		}
		// The corrupt record is left for a person, or pruned by its index.
		if _, err := s.GetOperation(ctx, ops[0].ID); err != nil && !errors.Is(err, state.ErrCorrupt) && !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("corrupt operation after the prune: %v", err)
		}
	})
	reply := `{"id":"` + ID(9) + `","status":"completed","result":{"ok":true}}`
	for _, tc := range []struct{ name, raw string }{
		{"garbage", "{not json"},
		{"command reply", reply},
		{"empty object", "{}"},
		{"another id", ""}, // filled with a valid record of another id
	} {
		for _, kind := range []string{"mapping", "export", "operation"} {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				s := open(t)
				ctx := ctxFor(t)
				vol, other := ID(1), ID(2)
				raw := tc.raw
				if _, err := s.PutMapping(ctx, Mapping(vol, "vm-1", "/dev/vdb")); err != nil {
					t.Fatal(err)
				}
				if _, err := s.PutExport(ctx, Export(vol, false)); err != nil {
					t.Fatal(err)
				}
				op := mustCreate(t, s, Op(1, commands.OpAttach, commands.StatusPending, vol, "vm-1", base))[0]
				if raw == "" {
					var v any = Mapping(other, "vm-1", "/dev/vdc")
					switch kind {
					case "export":
						v = Export(other, false)
					case "operation":
						v = Op(2, commands.OpAttach, commands.StatusPending, vol, "vm-1", base)
					}
					data, err := json.Marshal(v)
					if err != nil {
						t.Fatal(err)
					}
					raw = string(data)
				}
				id := vol
				if kind == "operation" {
					id = op.ID
				}
				spoil(ctx, kind, id, []byte(raw))
				checkCorrupt(t, s, kind, vol, op.ID)
			})
		}
	}
}

// checkCorrupt runs the checks of RunCorrupt on a spoiled record.
func checkCorrupt(t *testing.T, s state.Store, kind, vol, opID string) {
	ctx := ctxFor(t)
	var rev uint64
	var err error
	switch kind {
	case "mapping":
		var m commands.Mapping
		m, err = s.GetMapping(ctx, vol)
		rev = m.Revision
		if ms, lerr := s.ListMappings(ctx, ""); lerr != nil || len(ms) != 0 {
			t.Fatalf("listing over a corrupt mapping: %v, %v", ms, lerr)
		}
	case "export":
		var e commands.Export
		e, err = s.GetExport(ctx, vol)
		rev = e.Revision
		if es, lerr := s.ListExports(ctx); lerr != nil || len(es) != 0 {
			t.Fatalf("listing over a corrupt export: %v, %v", es, lerr)
		}
	case "operation":
		_, err = s.GetOperation(ctx, opID)
		if ops, _, lerr := s.ListOperations(ctx, state.Filter{}); lerr != nil || len(ops) != 0 {
			t.Fatalf("listing over a corrupt operation: %v, %v", ops, lerr)
		}
		if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), opID) {
			t.Fatalf("read of a corrupt operation: %v, want ErrCorrupt naming %s", err, opID)
		}
		return
	}
	if !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), vol) || rev == 0 {
		t.Fatalf("read of a corrupt %s: %v (revision %d), want ErrCorrupt naming %s with a revision", kind, err, rev, vol)
	}
	// The repair: a compare-and-swap on the corrupt record's revision.
	switch kind {
	case "mapping":
		m := Mapping(vol, "vm-2", "/dev/vdd")
		m.Revision = rev
		if _, err := s.PutMapping(ctx, m); err != nil {
			t.Fatalf("repair of a corrupt mapping: %v", err)
		}
		got, err := s.GetMapping(ctx, vol)
		if err != nil || got.VMID != "vm-2" {
			t.Fatalf("repaired mapping: %+v, %v", got, err)
		}
		if ms := mappingVolumes(t, s, "vm-2"); !slices.Equal(ms, []string{vol}) {
			t.Fatalf("mappings of vm-2 after the repair: %v", ms)
		}
		// The device the record named before it was damaged is free.
		if ms := mappingVolumes(t, s, "vm-1"); len(ms) != 0 {
			t.Fatalf("mappings of vm-1 after the repair: %v", ms)
		}
		if _, err := s.PutMapping(ctx, Mapping(ID(3), "vm-1", "/dev/vdb")); err != nil {
			t.Fatalf("mapping of the repaired record's old device: %v", err)
		}
	case "export":
		e := Export(vol, true)
		e.Revision = rev
		if _, err := s.PutExport(ctx, e); err != nil {
			t.Fatalf("repair of a corrupt export: %v", err)
		}
		if got, err := s.GetExport(ctx, vol); err != nil || !got.ReadOnly {
			t.Fatalf("repaired export: %+v, %v", got, err)
		}
	}
}
