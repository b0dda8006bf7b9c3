package handlers_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestReconcileMappings: with few mappings the reconcile asks CloudStack
// for each mapped volume, with many it lists every volume once (one page
// here); either way it removes the mapping of a volume detached behind
// its back and of one attached elsewhere, names them, and refreshes the
// sync time of the others.
func TestReconcileMappings(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mappings  int
		wantCalls int // listVolumes calls of the reconcile
	}{
		{"few, one call each", 3, 3},
		{"many, one list", handlers.ListAllAt + 4, 1},
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
			h := newHarness(t, harnessOpts{inventory: inv})
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
