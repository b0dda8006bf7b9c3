package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// outlast holds the create and attach jobs of the simulator pending past
// the daemon's 1 s step timeout, until the faults are cleared (a job of a
// fixed duration could end before a loaded daemon saw its step time out).
var outlast = cloudsim.Faults{JobHold: map[string]bool{"createVolume": true, "attachVolume": true}}

// timedOut waits for an operation that must fail on TIMEOUT saying its job
// may still run.
func (d *daemon) timedOut(opID string) commands.Operation {
	d.t.Helper()
	op := d.wait(opID)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeTimeout ||
		op.Details[commands.DetailJobMayRun] != true || op.Details[commands.DetailJobID] != op.JobID || op.JobID == "" {
		d.t.Fatalf("operation %s whose job outlasts the step: %+v", opID, op)
	}
	return op
}

// resolved checks an operation the force-sync resolved: still failed on
// TIMEOUT, its job succeeded.
func (d *daemon) resolved(opID string) commands.Operation {
	d.t.Helper()
	var op commands.Operation
	d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+opID, nil, &op)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeTimeout ||
		op.Details[commands.DetailJobMayRun] != false || op.Details[commands.DetailJobStatus] != commands.JobSucceeded {
		d.t.Fatalf("operation %s after force-sync: %+v", opID, op)
	}
	if at, err := time.Parse(time.RFC3339, op.Details[commands.DetailResolvedAt].(string)); err != nil || time.Since(at) > time.Minute {
		d.t.Fatalf("resolved_at %v: %v", op.Details[commands.DetailResolvedAt], err)
	}
	if r, _ := op.Details[commands.DetailResolution].(string); !strings.Contains(r, op.JobID) {
		d.t.Fatalf("resolution %q does not name job %s", r, op.JobID)
	}
	return op
}

// jobsDone waits until the simulator has no job pending.
func jobsDone(t *testing.T, sim *cloudsim.Sim) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, func() bool { return sim.Stats().PendingJobs == 0 }, "CloudStack's jobs end")
}

// TestTimedOutJobsResolvedBySync: a create and an attach whose CloudStack
// jobs outlast the step timeout fail on TIMEOUT saying the job may still
// run; once the jobs have ended, one force-sync records on each that its
// job succeeded, names the created volume, and records the attach's
// mapping. CloudStack holds exactly one volume of that create and one
// attach: nothing was sent again.
func TestTimedOutJobsResolvedBySync(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--step-timeout", "1s"}})
	vol := d.createVolume("timeout-attach", 1)
	sim.SetFaults(outlast)
	createID := d.submit(http.MethodPost, "/volumes", map[string]any{"name": "timeout-create", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID}).ID
	attachID := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID
	create, attach := d.timedOut(createID), d.timedOut(attachID)
	sim.SetFaults(cloudsim.Faults{})
	if create.VolumeID == "" {
		t.Fatalf("timed-out create without the volume id createVolume answered: %+v", create)
	}
	jobsDone(t, sim)
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
	calls := sim.Stats().Calls

	var res commands.SyncResult
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	for _, op := range []commands.Operation{create, attach} {
		if n := len(testenv.Mentioning(res.Changes, op.ID)); n != 1 {
			t.Fatalf("force-sync changes %q: want one line for operation %s", res.Changes, op.ID)
		}
	}
	if c := d.resolved(create.ID); c.Details["volume_id"] != create.VolumeID || c.VolumeID != create.VolumeID {
		t.Fatalf("resolved create names volume %v, want %s", c.Details["volume_id"], create.VolumeID)
	}
	d.resolved(attach.ID)
	var m commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &m)
	if m.VMID != cloudsim.RemoteVMID || m.CloudStackState != commands.CloudStackAttached || m.DeviceID == nil {
		t.Fatalf("mapping of the timed-out attach: %+v", m)
	}

	cs := cloudstack.NewClient(sim.URL(), cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)
	p := cs.Volume.NewListVolumesParams()
	p.SetName("timeout-create")
	vols, err := cs.Volume.ListVolumes(p)
	if err != nil || vols.Count != 1 || vols.Volumes[0].Id != create.VolumeID {
		t.Fatalf("CloudStack's volumes named timeout-create: %+v %v; want exactly %s", vols, err, create.VolumeID)
	}
	st := sim.Stats()
	if st.AttachesSucceeded[vol] != 1 {
		t.Fatalf("volume %s attached %d times", vol, st.AttachesSucceeded[vol])
	}
	for _, c := range []string{"createVolume", "attachVolume", "detachVolume", "deleteVolume"} {
		if st.Calls[c] != calls[c] {
			t.Fatalf("force-sync called %s (%d, before %d)", c, st.Calls[c], calls[c])
		}
	}
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	if len(res.Changes) != 0 {
		t.Fatalf("second force-sync changed %q", res.Changes)
	}
}

// TestTimedOutAttachHereMapsItsDevice: an attach to this host whose job
// outlasts the step timeout gets, on the force-sync after the job ended,
// its mapping with its device found and named.
func TestTimedOutAttachHereMapsItsDevice(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--step-timeout", "1s"}})
	vol := d.createVolume("timeout-local", 1)
	sim.SetFaults(outlast)
	op := d.timedOut(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID}).ID)
	sim.SetFaults(cloudsim.Faults{})
	jobsDone(t, sim)
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
	var res commands.SyncResult
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	if len(testenv.Mentioning(res.Changes, op.ID)) != 1 {
		t.Fatalf("force-sync changes %q: want the resolution of %s", res.Changes, op.ID)
	}
	d.resolved(op.ID)
	d.requireMapped(sim, vol)
}
