package handlers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"
	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
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

// TestReconcileMappings: with few mappings the reconcile asks CloudStack
// for each mapped volume, with many it lists every volume once (one page
// here), and asks by id for one the listing misses; either way it removes
// the mapping of a volume detached behind its back and of one attached
// elsewhere, names them, and refreshes the sync time of the others.
func TestReconcileMappings(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mappings  int
		missed    bool // the listing of every volume misses one still attached
		wantCalls int  // listVolumes calls of the reconcile
	}{
		{"few, one call each", 3, false, 3},
		{"many, one list", handlers.ListAllAt + 4, false, 1},
		{"many, one list missing a volume asked for by id", handlers.ListAllAt + 4, true, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inv := cloudsim.DefaultInventory()
			vmOf := func(i int) string { return fmt.Sprintf("0000000f-0000-4000-8000-%012x", i/4) }
			for i := range (tc.mappings + 3) / 4 {
				inv.VMs = append(inv.VMs, cloudsim.VM{ID: vmOf(4 * i), Name: fmt.Sprintf("vm-%d", i), ZoneID: cloudsim.ZoneID, State: "Running"})
			}
			vols := make([]string, tc.mappings)
			for i := range vols {
				vols[i] = fmt.Sprintf("0000000d-0000-4000-8000-%012x", i)
				inv.Volumes = append(inv.Volumes, cloudsim.DataVolume{ID: vols[i], Name: fmt.Sprintf("data-%d", i), ZoneID: cloudsim.ZoneID,
					SizeGB: 1, VMID: vmOf(i), DeviceID: []int64{1, 2, 4, 5}[i%4]})
			}
			opts := harnessOpts{inventory: inv}
			if tc.missed {
				opts.wrapCS = func(cs csapi.API) csapi.API { return missedInListing{API: cs, volume: vols[2]} }
			}
			h := newHarness(t, opts)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			before := time.Now().UTC().Add(-time.Hour)
			for i, vol := range vols {
				dev := inv.Volumes[i].DeviceID
				vm := vmOf(i)
				if i == 1 {
					vm = cloudsim.RemoteVMID // recorded on another VM than CloudStack's
				}
				if _, err := h.store.PutMapping(ctx, commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: vm,
					CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable, Size: 1 << 30,
					DeviceID: &dev, LastSync: before, CreatedAt: before, UpdatedAt: before}); err != nil {
					t.Fatal(err)
				}
			}
			cs := cloudstack.NewAsyncClient(h.sim.URL(), h.sim.APIKey(), h.sim.SecretKey(), false)
			p := cs.Volume.NewDetachVolumeParams()
			p.SetId(vols[0])
			if _, err := cs.Volume.DetachVolume(p); err != nil {
				t.Fatalf("detach behind volumed's back: %v", err)
			}

			calls := h.sim.Stats().Calls["listVolumes"]
			res := h.reconcile(t)
			if got := h.sim.Stats().Calls["listVolumes"] - calls; got != int64(tc.wantCalls) {
				t.Errorf("listVolumes calls: %d, want %d", got, tc.wantCalls)
			}
			if len(res.Changes) != 2 || !slices.ContainsFunc(res.Changes, func(c string) bool {
				return strings.Contains(c, vols[0]) && strings.Contains(c, "detached")
			}) || !slices.ContainsFunc(res.Changes, func(c string) bool {
				return strings.Contains(c, vols[1]) && strings.Contains(c, "attached to VM "+vmOf(1))
			}) {
				t.Fatalf("changes: %q", res.Changes)
			}
			ms, err := h.store.ListMappings(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			if len(ms) != tc.mappings-2 {
				t.Fatalf("%d mappings left, want %d", len(ms), tc.mappings-2)
			}
			for _, m := range ms {
				if !m.LastSync.After(before) {
					t.Errorf("mapping of %s: last sync %v not refreshed", m.VolumeID, m.LastSync)
				}
			}
		})
	}
}

// TestReconcileRepairsCorruptRecords: mapping and export records damaged
// behind volumed's back (a command reply published on a mapping's key,
// garbage, an empty object) read as errors naming the key, and the
// reconcile rewrites them from CloudStack by compare-and-swap: the
// mapping of a volume CloudStack has attached anew, that of a detached
// one and the export record deleted; one bad record does not fail it.
func TestReconcileRepairsCorruptRecords(t *testing.T) {
	inv := cloudsim.DefaultInventory()
	attached, detached := "0000000d-0000-4000-8000-000000000001", "0000000d-0000-4000-8000-000000000002"
	inv.Volumes = append(inv.Volumes,
		cloudsim.DataVolume{ID: attached, Name: "data-1", ZoneID: cloudsim.ZoneID, SizeGB: 1, VMID: cloudsim.RemoteVMID, DeviceID: 1},
		cloudsim.DataVolume{ID: detached, Name: "data-2", ZoneID: cloudsim.ZoneID, SizeGB: 1})
	h := newHarness(t, harnessOpts{inventory: inv})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	now := time.Now().UTC()
	for _, vol := range []string{attached, detached} {
		if _, err := h.store.PutMapping(ctx, commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: cloudsim.RemoteVMID,
			CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable, LastSync: now, CreatedAt: now, UpdatedAt: now}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.store.PutExport(ctx, commands.Export{VolumeID: attached, VMID: cloudsim.RemoteVMID, ExportName: "vol00000001",
		Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	kv, err := h.bus.JetStream().KeyValue(ctx, state.DefaultKVBucket)
	if err != nil {
		t.Fatal(err)
	}
	for key, raw := range map[string]string{
		"map." + attached:    `{"id":"00000000-0000-4000-8000-000000000009","status":"completed","result":{}}`,
		"map." + detached:    "{not json",
		"export." + attached: "{}",
	} {
		if _, err := kv.Put(ctx, key, []byte(raw)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.store.GetMapping(ctx, attached); !errors.Is(err, state.ErrCorrupt) || !strings.Contains(err.Error(), "map."+attached) {
		t.Fatalf("read of a corrupt mapping: %v", err)
	}
	if e := state.APIError(state.ErrCorrupt); e.Code != commands.CodeInternalError {
		t.Fatalf("a corrupt record answers %s, want %s", e.Code, commands.CodeInternalError)
	}

	res := h.reconcile(t)
	for _, want := range []string{"rewrote the corrupt mapping record map." + attached, "deleted the corrupt mapping record map." + detached,
		"deleted the corrupt export record export." + attached} {
		if !slices.ContainsFunc(res.Changes, func(c string) bool { return strings.HasPrefix(c, want) }) {
			t.Errorf("changes %q lack %q", res.Changes, want)
		}
	}
	m, err := h.store.GetMapping(ctx, attached)
	if err != nil || m.VMID != cloudsim.RemoteVMID || m.DeviceID == nil || *m.DeviceID != 1 {
		t.Fatalf("repaired mapping: %+v, %v", m, err)
	}
	if _, err := h.store.GetMapping(ctx, detached); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("mapping of the detached volume: %v, want not found", err)
	}
	if _, err := h.store.GetExport(ctx, attached); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("corrupt export record: %v, want deleted", err)
	}
	if res := h.reconcile(t); slices.ContainsFunc(res.Changes, func(c string) bool { return strings.Contains(c, "corrupt") }) {
		t.Fatalf("a second reconcile repairs again: %q", res.Changes)
	}
}
