package e2e_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestForceSyncRepairsDrift detaches a volume behind volumed's back, with
// the cloudstack-go client, and requires force-sync to remove the mapping
// and say so.
func TestForceSyncRepairsDrift(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("drift", 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)

	var res commands.SyncResult
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	if res.Message != "Force sync completed successfully" || len(res.Changes) != 0 {
		t.Fatalf("force-sync with nothing drifted: %+v", res)
	}

	cs := cloudstack.NewAsyncClient(sim.URL(), cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)
	p := cs.Volume.NewDetachVolumeParams()
	p.SetId(vol)
	if _, err := cs.Volume.DetachVolume(p); err != nil {
		t.Fatalf("detach behind volumed's back: %v", err)
	}
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	if len(res.Changes) != 1 || !strings.Contains(res.Changes[0], vol) || !strings.Contains(res.Changes[0], "detached") {
		t.Fatalf("force-sync after drift: %+v", res)
	}
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
}
