package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// Releases of main whose data the upgrade tests carry over: the last one
// before NATS authorization (streams and bucket in the global account,
// Redis records as JSON strings under "volumed:"), and the main this
// upgrade work began from (the layout since).
const (
	releasePreAuth  = "eb11269"
	releasePrevious = "10bb206"
)

// oldVolumed builds volumed as it was at commit, without -race, once:
// the binary is kept under the temporary directory by the commit's full
// hash for later runs. It needs the repository's history (git), and skips
// without it unless CI=true.
func oldVolumed(t *testing.T, commit string) string {
	t.Helper()
	full, err := exec.Command("git", "rev-parse", "--verify", commit+"^{commit}").Output()
	testenv.Require(t, err == nil, "needs git and commit %s in the repository's history: %v", commit, err)
	hash := strings.TrimSpace(string(full))
	dir := filepath.Join(os.TempDir(), "volumed-release-"+hash)
	bin := filepath.Join(dir, "volumed")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	src, err := os.MkdirTemp("", "volumed-src-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(src)
	archive := filepath.Join(src, "src.tar")
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("git rev-parse --show-toplevel: %v", err)
	}
	git := exec.Command("git", "archive", "-o", archive, hash)
	git.Dir = strings.TrimSpace(string(top))
	if out, err := git.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v: %s", commit, err, out)
	}
	if out, err := exec.Command("tar", "-xf", archive, "-C", src).CombinedOutput(); err != nil {
		t.Fatalf("untar %s: %v: %s", commit, err, out)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "volumed.building")
	build := exec.Command("go", "build", "-o", tmp, "./cmd/volumed")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build volumed at %s: %v: %s", commit, err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

// operations lists every operation over REST.
func (d *daemon) operations() []commands.OperationSummary {
	d.t.Helper()
	var ops []commands.OperationSummary
	d.mustCall(http.StatusOK, http.MethodGet, "/operations?limit=1000", nil, &ops)
	return ops
}

// TestUpgradeInPlace: volumed of an earlier main records two volumes, an
// attach with its mapping, an export, and two operations accepted during
// a CloudStack outage (their jobs still queued), then stops; this release,
// started on the same data dir (and Redis), answers every operation and
// the mapping as before, serves the export over NBD, and runs the queued
// operations (a create, an attach) once CloudStack is back.
func TestUpgradeInPlace(t *testing.T) {
	for _, tc := range []struct {
		name, commit string
		redis        bool
	}{
		{"pre-authorization embedded", releasePreAuth, false},
		{"pre-authorization redis", releasePreAuth, true},
		{"previous main embedded", releasePrevious, false},
		{"previous main redis", releasePrevious, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireNBDClients(t)
			sim := startLocalSim(t, false)
			o := daemonOpts{dataDir: t.TempDir()}
			if tc.redis {
				o.redisURL = testenv.StartRedis(t).URL()
			}
			old := newDaemon(t, sim, o)
			old.bin = oldVolumed(t, tc.commit)
			old.start()
			t.Cleanup(old.stop)

			vol1, vol2 := old.createVolume("upgrade-1", 1), old.createVolume("upgrade-2", 1)
			old.attachLocal(vol1)
			mapping := old.requireMapped(sim, vol1)
			old.exportVolume(vol1, true)
			old.requireExports(vol1)
			sim.SetFaults(cloudsim.Faults{Outage: true})
			queued := old.submit(http.MethodPost, "/volumes", map[string]any{"name": "upgrade-queued", "size": 1 << 30,
				"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
			// On a volume's line, as a create is on its own.
			queuedAttach := old.submit(http.MethodPost, "/volumes/"+vol2+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
			before := old.operations()
			if len(before) != 6 {
				t.Fatalf("the old release lists %d operations, want 6: %+v", len(before), before)
			}
			old.stop()

			d := startDaemon(t, sim, o)
			if tc.commit == releasePreAuth {
				moved := testenv.Mentioning(d.out.Lines(), "stream moved from the global account")
				if !strings.Contains(strings.Join(moved, "\n"), "stream="+bus.StreamJobs+" copied=2") {
					t.Fatalf("the queued job was not moved out of the global account:\n%s", strings.Join(moved, "\n"))
				}
			}
			after := map[string]commands.OperationSummary{}
			for _, op := range d.operations() {
				after[op.ID] = op
			}
			for _, op := range before {
				got, ok := after[op.ID]
				switch {
				case !ok:
					t.Errorf("operation %s (%s of %s) lost", op.ID, op.Type, op.VolumeID)
				case got.Type != op.Type || got.VolumeID != op.VolumeID || (op.Status.Terminal() && got.Status != op.Status):
					t.Errorf("operation %s: %+v, was %+v", op.ID, got, op)
				}
			}
			if m := d.requireMapped(sim, vol1); m.DevicePath != mapping.DevicePath || m.VMID != mapping.VMID {
				t.Errorf("mapping of %s: %+v, was %+v", vol1, m, mapping)
			}
			d.requireExports(vol1)
			sim.SetFaults(cloudsim.Faults{})
			done := d.completed(queued.ID)
			if done.VolumeID == "" || done.VolumeID == vol1 || done.VolumeID == vol2 {
				t.Fatalf("the queued create made volume %q", done.VolumeID)
			}
			if att := d.completed(queuedAttach.ID); att.VolumeID != vol2 {
				t.Fatalf("the queued attach: %+v", att)
			}
			if n := len(d.operations()); n != len(before) {
				t.Fatalf("%d operations after the upgrade, want %d", n, len(before))
			}
			// The queued job itself ran: none was queued again beside it.
			for _, s := range []string{"requeued operations without a job", "operation taken over by another executor"} {
				if lines := testenv.Mentioning(d.out.Lines(), s); len(lines) > 0 {
					t.Fatalf("after the upgrade:\n%s", strings.Join(lines, "\n"))
				}
			}
		})
	}
}

// TestUpgradeAfterDowngrade: the release before NATS authorization run
// again on a data dir this release wrote (a downgrade) starts empty and
// records what it accepts in the global account, a create completed and
// one queued during a CloudStack outage; this release started again on it
// lists every operation, of both, and runs the queued create once.
func TestUpgradeAfterDowngrade(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	o := daemonOpts{dataDir: t.TempDir()}
	d := startDaemon(t, sim, o)
	d.createVolume("before-downgrade", 1)
	d.stop()

	old := newDaemon(t, sim, o)
	old.bin = oldVolumed(t, releasePreAuth)
	old.start()
	t.Cleanup(old.stop)
	old.createVolume("during-downgrade", 1)
	sim.SetFaults(cloudsim.Faults{Outage: true})
	queued := old.submit(http.MethodPost, "/volumes", map[string]any{"name": "queued-during-downgrade", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	old.stop()

	d.start()
	if n := len(d.operations()); n != 3 {
		t.Fatalf("%d operations after the downgrade and the upgrade again, want 3:\n%s", n, d.out.String())
	}
	sim.SetFaults(cloudsim.Faults{})
	d.completed(queued.ID)
	cs := csapi.New(csapi.Config{URL: sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey})
	made, err := cs.ListVolumes(context.Background(), csapi.ListFilter{Name: "queued-during-downgrade"})
	if err != nil || len(made) != 1 {
		t.Fatalf("the queued create made %v (%v), want one volume", made, err)
	}
}

// TestUpgradeRefusesNewerData: a data dir recorded by a newer release is
// refused at start, exit status 2, with the reason, and left as it was.
func TestUpgradeRefusesNewerData(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	o := daemonOpts{dataDir: t.TempDir()}
	marker := filepath.Join(o.dataDir, "nats", bus.FormatFile)
	if err := os.MkdirAll(filepath.Dir(marker), 0o700); err != nil {
		t.Fatal(err)
	}
	const newer = `{"format": 99}`
	if err := os.WriteFile(marker, []byte(newer), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, sim, o)
	d.launch()
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		d.kill9()
		t.Fatalf("volumed started on data of a newer release:\n%s", d.out.String())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 2 {
		t.Fatalf("exit status %d, want 2:\n%s", code, d.out.String())
	}
	if !strings.Contains(d.out.String(), "format 99, written by a newer volumed") {
		t.Fatalf("no reason given:\n%s", d.out.String())
	}
	if data, err := os.ReadFile(marker); err != nil || string(data) != newer {
		t.Fatalf("the format record changed: %q %v", data, err)
	}
}

// accepter keeps creating volumes through the members of a cluster that
// are up, as a careful client does: each create has its own
// Idempotency-Key, and one not answered 201 is sent again, same key, to
// the next member until it is.
type accepter struct {
	mu       sync.Mutex
	accepted []commands.Operation // by create, in order
	down     int                  // the member being upgraded; -1 none
	retries  int                  // creates sent again
	failures []string             // why, for the log
}

// rollingName is the volume name of create i.
func rollingName(i int) string { return fmt.Sprintf("rolling-%04d", i) }

func (a *accepter) setDown(i int) {
	a.mu.Lock()
	a.down = i
	a.mu.Unlock()
}

// run submits creates until stop is closed; it gives up on a create after
// a minute of tries.
func (a *accepter) run(ds []*daemon, stop <-chan struct{}) {
	hc := &http.Client{Timeout: 10 * time.Second}
	k := 0
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		body := fmt.Sprintf(`{"name":%q,"size":%d,"disk_offering_id":%q,"zone_id":%q}`, rollingName(i), 1<<30,
			cloudsim.CustomOfferingID, cloudsim.ZoneID)
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); k++ {
			a.mu.Lock()
			skip := k%len(ds) == a.down
			a.mu.Unlock()
			if skip {
				continue
			}
			req, _ := http.NewRequest(http.MethodPost, ds[k%len(ds)].api+"/volumes", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", rollingName(i))
			var op commands.Operation
			resp, err := hc.Do(req)
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&op)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusCreated {
					err = fmt.Errorf("status %d: %s", resp.StatusCode, op.Error)
				}
			}
			if err == nil {
				a.mu.Lock()
				a.accepted = append(a.accepted, op)
				a.mu.Unlock()
				k++
				break
			}
			a.mu.Lock()
			a.retries++
			a.failures = append(a.failures, fmt.Sprintf("%s via %s: %v", rollingName(i), embeddedMember(k%len(ds)), err))
			a.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestUpgradeRollingCluster: three volumed of the previous main in one
// embedded cluster are replaced by this release one at a time while a
// client keeps creating volumes through the members up; every create is
// accepted (a few sent again under their Idempotency-Key while a stream
// leader moves), completes, and made exactly one CloudStack volume.
func TestUpgradeRollingCluster(t *testing.T) {
	bin := oldVolumed(t, releasePrevious)
	sim := startSim(t, cloudsim.Config{})
	ds := startEmbeddedClusterOf(t, sim, 3, bin)
	a := &accepter{down: -1}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); a.run(ds, stop) }()
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			<-done
		}
	}()
	// Creates go on while each member is down, and after it is back.
	more := func(what string) {
		t.Helper()
		a.mu.Lock()
		from := len(a.accepted)
		a.mu.Unlock()
		testenv.Eventually(t, time.Minute, func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			return len(a.accepted) >= from+3
		}, "three more creates accepted %s", what)
	}
	for i, d := range ds {
		a.setDown(i)
		d.stop()
		more("while " + embeddedMember(i) + " is down")
		d.bin = ""
		d.launch()
		d.awaitHealthy(90 * time.Second)
		a.setDown(-1)
		more("once " + embeddedMember(i) + " runs this release")
	}
	close(stop)
	<-done
	stopped = true
	a.mu.Lock()
	accepted, retries, failures := slices.Clone(a.accepted), a.retries, slices.Clone(a.failures)
	a.mu.Unlock()
	cs := csapi.New(csapi.Config{URL: sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey})
	for i, op := range accepted {
		done := ds[i%len(ds)].completed(op.ID)
		made, err := cs.ListVolumes(context.Background(), csapi.ListFilter{Name: rollingName(i)})
		if err != nil || len(made) != 1 || made[0].ID != done.VolumeID {
			t.Errorf("create %s: CloudStack has %v (%v), want exactly %s", rollingName(i), made, err, done.VolumeID)
		}
	}
	t.Logf("%d creates accepted during the rolling upgrade, all completed once; %d sent again:\n%s",
		len(accepted), retries, strings.Join(failures, "\n"))
}
