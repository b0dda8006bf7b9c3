package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/test/cloudsim"
)

func TestTransientFailuresAreRetried(t *testing.T) {
	sim := startSim(t, cloudsim.Config{Seed: 7})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("flaky", 1)
	sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{
		"attachVolume": {Rate: 1, Kind: cloudsim.ErrorKindDrop},
	}})
	op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
	// The dropped connections are recorded as the last error while retrying.
	var cur commands.Operation
	deadline := time.Now().Add(15 * time.Second)
	for cur.Error == "" && time.Now().Before(deadline) {
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
	}
	if cur.Status != commands.StatusExecuting || !strings.Contains(cur.Error, "retrying") {
		t.Fatalf("operation while CloudStack drops connections: %+v", cur)
	}
	sim.SetFaults(cloudsim.Faults{})
	done := d.completed(op.ID)
	if done.Error != "" {
		t.Fatalf("completed operation keeps error %q", done.Error)
	}
	if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
		t.Fatalf("attaches done: %d, want 1", n)
	}
}

func TestFinalFailuresAreNot(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("final", 1)
	sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"attachVolume": {Rate: 1, Kind: "431"}}})
	op := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	if op.Status != commands.StatusFailed || op.Details["cloudstack_error_code"] != float64(431) {
		t.Fatalf("operation after a 431: %+v", op)
	}
	if n := sim.Stats().Calls["attachVolume"]; n != 1 {
		t.Fatalf("attachVolume called %d times; a final error must not be retried", n)
	}
}

func TestStepTimeout(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--step-timeout", "2s"}})
	vol := d.createVolume("hang", 1)
	sim.SetFaults(cloudsim.Faults{JobHangRate: map[string]float64{"attachVolume": 1}})
	op := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeTimeout || !strings.Contains(op.Error, "did not finish within 2s") {
		t.Fatalf("operation with a job that never ends: %+v", op)
	}
	// The job may still run in CloudStack, and the operation says so.
	if op.Details["job_may_run"] != true || op.Details["cloudstack_job_id"] != op.JobID || op.JobID == "" {
		t.Fatalf("TIMEOUT details %v (job %q): want job_may_run and the job's id", op.Details, op.JobID)
	}
}

// TestInternalErrorRetriedAFewTimes: CloudStack's 530 is retried a few
// times, then the operation fails with CloudStack's code and text.
func TestInternalErrorRetriedAFewTimes(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("internal-error", 1)
	sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"attachVolume": {Rate: 1, Kind: cloudsim.ErrorKind530}}})
	op := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	if op.Status != commands.StatusFailed || op.Details["cloudstack_error_code"] != float64(530) || op.Details["cloudstack_message"] == "" {
		t.Fatalf("operation after repeated 530s: %+v", op)
	}
	if n := sim.Stats().Calls["attachVolume"]; n != 1+csapi.Retries530 {
		t.Fatalf("attachVolume called %d times, want %d (one and %d retries)", n, 1+csapi.Retries530, csapi.Retries530)
	}
}

func TestHealthAndOutage(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	var h commands.Health
	d.mustCall(http.StatusOK, http.MethodGet, "/health", nil, &h)
	if h.Status != commands.Healthy || h.CloudStackHealth != commands.Healthy || h.DatabaseHealth != commands.Healthy ||
		h.Details.Store != "embedded" {
		t.Fatalf("health: %+v", h)
	}
	sim.SetFaults(cloudsim.Faults{Outage: true})
	d.mustCall(http.StatusOK, http.MethodGet, "/health", nil, &h)
	if h.Status != commands.Degraded || h.CloudStackHealth != commands.Unhealthy || h.Details.Errors["cloudstack"] == "" {
		t.Fatalf("health during a CloudStack outage: %+v", h)
	}
	// Accepted during the outage, executed after it.
	op := d.submit(http.MethodPost, "/volumes", map[string]any{"name": "during-outage", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	sim.SetFaults(cloudsim.Faults{})
	d.completed(op.ID)
}

// TestLostReplies: CloudStack does half of the creates, attaches and
// detaches but their answers are lost (the simulator's drop-after). Every
// operation completes, each create makes exactly one CloudStack volume,
// and each attach and detach happens exactly once.
func TestLostReplies(t *testing.T) {
	sim := startSim(t, cloudsim.Config{Seed: 11})
	d := startDaemon(t, sim, daemonOpts{})
	lost := cloudsim.ErrorFault{Rate: 0.5, Kind: cloudsim.ErrorKindDropAfter}
	sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{
		"createVolume": lost, "attachVolume": lost, "detachVolume": lost}})
	const n = 6
	vols := make([]string, n)
	for i := range vols {
		vols[i] = d.createVolume(fmt.Sprintf("lost-%d", i), 1)
	}
	for _, vol := range vols {
		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	}
	for _, vol := range vols {
		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	}
	for _, cmd := range []string{"createVolume", "attachVolume", "detachVolume"} {
		if !regexp.MustCompile(`command=` + cmd + `.*maybe_done=true`).MatchString(d.out.String()) {
			t.Fatalf("no answer to %s was lost: the test proves nothing", cmd)
		}
	}
	requireOnceEach(t, sim, "lost-", vols)
}

// requireOnceEach checks that CloudStack made exactly one volume named
// prefix+i for each vols[i], and attached and detached each once.
func requireOnceEach(t *testing.T, sim *cloudsim.Sim, prefix string, vols []string) {
	t.Helper()
	st := sim.Stats()
	cs := csapi.New(csapi.Config{URL: sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey})
	for i, vol := range vols {
		name := fmt.Sprintf("%s%d", prefix, i)
		made, err := cs.ListVolumes(context.Background(), csapi.ListFilter{Name: name})
		if err != nil || len(made) != 1 || made[0].ID != vol {
			t.Errorf("create %s: CloudStack has %v (%v), want exactly %s", name, made, err, vol)
		}
		if st.AttachesSucceeded[vol] != 1 || st.DetachesSucceeded[vol] != 1 {
			t.Errorf("volume %s: %d attaches, %d detaches done, want 1 and 1", vol, st.AttachesSucceeded[vol], st.DetachesSucceeded[vol])
		}
	}
}
