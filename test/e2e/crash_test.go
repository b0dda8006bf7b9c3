package e2e_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestCrashDuringAttach kills volumed with SIGKILL while a separate
// cloudsim process runs the attach job, restarts volumed on the same data,
// and requires the operation to end completed with exactly one attach done
// in CloudStack.
func TestCrashDuringAttach(t *testing.T) {
	forEachStore(t, func(t *testing.T, o daemonOpts) {
		sim := startSimProcess(t)
		d := startDaemon(t, sim, o)
		vol := d.createVolume("crash", 1)

		// The job is held until volumed is dead: a job with a duration
		// could end, and the operation complete in attempt 1, between the
		// check below and the kill on a loaded machine.
		sim.setFaults(cloudsim.Faults{JobHold: map[string]bool{"attachVolume": true}})
		op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
		testenv.Eventually(t, 30*time.Second, func() bool {
			var cur commands.Operation
			d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
			return cur.JobID != "" && cur.Status == commands.StatusExecuting
		}, "attach job started")
		d.kill9()
		sim.setFaults(cloudsim.Faults{})
		d.restart()

		done := d.completed(op.ID)
		if done.Response == nil || done.Response.VMID != cloudsim.RemoteVMID {
			t.Fatalf("attach after restart: %+v", done)
		}
		if n := sim.stats().AttachesSucceeded[vol]; n != 1 {
			t.Fatalf("attaches done in CloudStack: %d, want exactly 1", n)
		}
		if done.Attempts < 2 {
			t.Fatalf("attempts %d: the operation was not resumed after the crash", done.Attempts)
		}
	})
}

// TestCrashBeforeJobRecorded kills volumed right after the attach call was
// made but, with CloudStack slow to answer, before its job id was recorded:
// the resumed operation must not attach twice.
func TestCrashBeforeJobRecorded(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("crash-early", 1)
	sim.SetFaults(cloudsim.Faults{
		Latency:     map[string]cloudsim.Duration{"attachVolume": cloudsim.Duration(2 * time.Second)},
		JobDuration: map[string]cloudsim.Duration{"attachVolume": cloudsim.Duration(time.Second)},
	})
	op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
	testenv.Eventually(t, 10*time.Second, func() bool {
		var cur commands.Operation
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
		return cur.Step == "attach:requested"
	}, "attach requested")
	d.kill9()
	sim.SetFaults(cloudsim.Faults{})
	d.restart()
	d.completed(op.ID)
	if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
		t.Fatalf("attaches done in CloudStack: %d, want exactly 1", n)
	}
}

// TestCrashDuringCreate kills volumed while CloudStack runs the create
// job: after the restart the operation completes on the same volume, with
// one createVolume call, and later operations on it run.
func TestCrashDuringCreate(t *testing.T) {
	sim := startSimProcess(t)
	d := startDaemon(t, sim, daemonOpts{})
	sim.setFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"createVolume": cloudsim.Duration(3 * time.Second)}})
	op := d.submit(http.MethodPost, "/volumes", map[string]any{"name": "crash-create", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	var cur commands.Operation
	testenv.Eventually(t, 10*time.Second, func() bool {
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
		return cur.VolumeID != "" && cur.JobID != ""
	}, "create job started")
	d.kill9()
	d.restart()
	done := d.completed(op.ID)
	if done.VolumeID != cur.VolumeID {
		t.Fatalf("create completed on %s, CloudStack made %s", done.VolumeID, cur.VolumeID)
	}
	if n := sim.stats().Calls["createVolume"]; n != 1 {
		t.Fatalf("createVolume called %d times, want 1", n)
	}
	d.completed(d.submit(http.MethodDelete, "/volumes/"+done.VolumeID, nil).ID)
}
