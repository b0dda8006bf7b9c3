package e2e_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// pause stops the daemon's process (SIGSTOP) until resume; the test's
// cleanup resumes it, so it can be stopped.
func (d *daemon) pause() {
	d.t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		d.t.Fatalf("SIGSTOP: %v", err)
	}
	d.t.Cleanup(d.resume)
}

// resume continues a paused daemon (SIGCONT).
func (d *daemon) resume() { _ = d.cmd.Process.Signal(syscall.SIGCONT) }

// pauseRunner waits until op's CloudStack job runs, pauses the instance
// polling it, and returns its index.
func pauseRunner(t *testing.T, ds []*daemon, opID string) int {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, func() bool {
		var cur commands.Operation
		ds[0].mustCall(http.StatusOK, http.MethodGet, "/operations/"+opID, nil, &cur)
		return cur.JobID != "" && cur.Status == commands.StatusExecuting
	}, "job of %s started", opID)
	runners := executedBy(ds, opID)
	if len(runners) != 1 {
		t.Fatalf("operation %s executing on instances %v, want exactly one", opID, runners)
	}
	ds[runners[0]].pause()
	return runners[0]
}

// awaitStopped waits for the resumed instance to log that it stopped op,
// taken over, without writing, and requires intact to hold (every
// instance answering the volume's device as it should) meanwhile and
// after.
func awaitStopped(t *testing.T, ds []*daemon, late int, opID string, intact func(d *daemon) string) {
	t.Helper()
	re := regexp.MustCompile(`operation taken over by another executor; stopping, nothing more written.*operation_id=` + regexp.QuoteMeta(opID))
	check := func() {
		for _, d := range ds {
			if broken := intact(d); broken != "" {
				t.Fatalf("after the late executor of %s resumed: %s", opID, broken)
			}
		}
	}
	testenv.Eventually(t, 30*time.Second, func() bool {
		check()
		return re.MatchString(ds[late].out.String())
	}, "the late executor of %s logs that it stopped", opID)
	check()
}

// TestFencedLateExecutor: two volumed on one NATS cluster. The instance
// running an operation is paused (SIGSTOP) while it polls the CloudStack
// job; after --ack-wait the other takes it over as attempt 2 and completes
// it, and a later operation on the volume completes. The paused instance
// is resumed (SIGCONT), sees its job done, and must change nothing: a late
// attach records no mapping of the volume detached since, a late detach
// deletes no mapping of the volume attached since. Both say why they
// stopped.
func TestFencedLateExecutor(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	c := startNATSCluster(t, 3)
	ds := startInstances(t, sim, c, 2)
	attach := map[string]string{"vm_id": cloudsim.RemoteVMID}
	// A job is held until its runner is paused: a job with a duration
	// could end, and the operation complete in attempt 1, before the pause
	// on a loaded machine.
	holdJob := func(command string) {
		sim.SetFaults(cloudsim.Faults{JobHold: map[string]bool{command: true}})
	}

	t.Run("late attach", func(t *testing.T) {
		vol := ds[0].createVolume("fence-attach", 1)
		holdJob("attachVolume")
		op := ds[0].submit(http.MethodPost, "/volumes/"+vol+"/attach", attach)
		late := pauseRunner(t, ds, op.ID)
		sim.SetFaults(cloudsim.Faults{})
		other := ds[1-late]
		if done := other.completed(op.ID); done.Attempts < 2 {
			t.Fatalf("attach completed in attempt %d: it was not taken over", done.Attempts)
		}
		other.completed(other.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
		other.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)

		ds[late].resume()
		awaitStopped(t, ds, late, op.ID, func(d *daemon) string {
			if status, body := d.call(http.MethodGet, "/volumes/"+vol+"/device", nil); status != http.StatusNotFound {
				return fmt.Sprintf("the detached volume's device answers %d %s, want 404", status, body)
			}
			return ""
		})
		if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
			t.Fatalf("attaches done in CloudStack: %d, want exactly 1", n)
		}
	})

	t.Run("late detach", func(t *testing.T) {
		vol := ds[0].createVolume("fence-detach", 1)
		ds[0].completed(ds[0].submit(http.MethodPost, "/volumes/"+vol+"/attach", attach).ID)
		holdJob("detachVolume")
		op := ds[0].submit(http.MethodPost, "/volumes/"+vol+"/detach", nil)
		late := pauseRunner(t, ds, op.ID)
		sim.SetFaults(cloudsim.Faults{})
		other := ds[1-late]
		if done := other.completed(op.ID); done.Attempts < 2 {
			t.Fatalf("detach completed in attempt %d: it was not taken over", done.Attempts)
		}
		other.completed(other.submit(http.MethodPost, "/volumes/"+vol+"/attach", attach).ID)
		var newer commands.Mapping
		other.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &newer)

		ds[late].resume()
		awaitStopped(t, ds, late, op.ID, func(d *daemon) string {
			status, body := d.call(http.MethodGet, "/volumes/"+vol+"/device", nil)
			var m commands.Mapping
			if status != http.StatusOK || json.Unmarshal(body, &m) != nil || m.ID != newer.ID || m.VMID != cloudsim.RemoteVMID {
				return fmt.Sprintf("the attached volume's device answers %d %s, want the newer attach's mapping %s", status, body, newer.ID)
			}
			return ""
		})
	})
}
