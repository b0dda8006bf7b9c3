package e2e_test

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// lifecycleCommands are the CloudStack calls the lifecycle kinds make.
var lifecycleCommands = []string{"createSnapshot", "deleteSnapshot", "revertSnapshot", "resizeVolume", "createTags", "deleteTags", "createVolume"}

// readyVolume creates a 1 GiB volume and makes it Ready (attached once to
// the remote VM, then detached).
func (d *daemon) readyVolume(name string) string {
	d.t.Helper()
	vol := d.createVolume(name, 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	return vol
}

// simAPI is a CloudStack client of the simulator, for the test's own looks.
func simAPI(sim *cloudsim.Sim) csapi.API {
	return csapi.New(csapi.Config{URL: sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey})
}

// TestLifecycleLostReplies: CloudStack does half of the new calls but
// their answers are lost. Every operation completes; each snapshot
// operation takes one snapshot, the resize is sent once, tags are exact
// and written once each, a volume from a snapshot is made once, each
// delete_snapshot is sent once.
func TestLifecycleLostReplies(t *testing.T) {
	sim := startSim(t, cloudsim.Config{Seed: 7})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.readyVolume("lost-life")
	lost := cloudsim.ErrorFault{Rate: 0.5, Kind: cloudsim.ErrorKindDropAfter}
	faults := cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{}}
	for _, c := range lifecycleCommands {
		faults.Errors[c] = lost
	}
	sim.SetFaults(faults)
	before := sim.Stats().Calls

	const n = 6
	var snaps []string
	for range n {
		op := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/snapshots", nil).ID)
		snaps = append(snaps, op.Response.SnapshotID)
	}
	var listed []commands.Snapshot
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/snapshots", nil, &listed)
	if len(listed) != n {
		t.Fatalf("%d snapshots listed, want %d: %+v", len(listed), n, listed)
	}
	for i, s := range listed { // newest first
		if s.ID != snaps[n-1-i] {
			t.Fatalf("snapshot %d is %s, want %s (one per operation)", i, s.ID, snaps[n-1-i])
		}
	}

	sizes := []int64{2, 3, 4}
	for _, gib := range sizes {
		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/resize", map[string]any{"size": gib << 30}).ID)
	}
	sets := []map[string]string{{"a": "1", "b": "2"}, {"b": "3", "c": "4"}, {"c": "4"}, {"d": "5", "e": "6"}}
	for _, set := range sets {
		d.completed(d.submit(http.MethodPut, "/volumes/"+vol+"/tags", map[string]any{"tags": set}).ID)
	}
	for range 3 {
		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/revert", map[string]string{"snapshot_id": snaps[0]}).ID)
	}
	var clones []string
	for i := range 3 {
		op := d.completed(d.submit(http.MethodPost, "/volumes", map[string]any{"name": fmt.Sprintf("lost-clone-%d", i), "snapshot_id": snaps[1]}).ID)
		clones = append(clones, op.VolumeID)
	}
	for _, s := range snaps[2:] {
		d.completed(d.submit(http.MethodDelete, "/snapshots/"+s, nil).ID)
	}

	calls := sim.Stats().Calls
	sent := func(c string) int64 { return calls[c] - before[c] }
	for _, c := range lifecycleCommands {
		if !regexp.MustCompile(`command=` + c + `.*maybe_done=true`).MatchString(d.out.String()) {
			t.Errorf("no answer to %s was lost: the test proves nothing for it", c)
		}
	}
	for c, want := range map[string]int64{"createSnapshot": n, "resizeVolume": int64(len(sizes)), "createTags": 3,
		"deleteTags": 3, "createVolume": 3, "deleteSnapshot": n - 2} {
		if got := sent(c); got != want {
			t.Errorf("%s sent %d times, want %d (once per needed write)", c, got, want)
		}
	}
	var st commands.VolumeStatus
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
	if !maps.Equal(st.Tags, sets[len(sets)-1]) {
		t.Errorf("tags %v, want %v", st.Tags, sets[len(sets)-1])
	}
	if st.Size != 1<<30 {
		t.Errorf("size after the revert %d, want the snapshot's 1 GiB", st.Size)
	}
	cs := simAPI(sim)
	for i, id := range clones {
		made, err := cs.ListVolumes(context.Background(), csapi.ListFilter{Name: fmt.Sprintf("lost-clone-%d", i)})
		if err != nil || len(made) != 1 || made[0].ID != id || made[0].SnapshotID != snaps[1] {
			t.Errorf("clone %d: CloudStack has %+v (%v), want exactly %s", i, made, err, id)
		}
	}
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/snapshots", nil, &listed)
	if len(listed) != 2 {
		t.Errorf("%d snapshots left, want 2", len(listed))
	}
	var failed []commands.OperationSummary
	d.mustCall(http.StatusOK, http.MethodGet, "/operations?status=failed", nil, &failed)
	if len(failed) != 0 {
		t.Errorf("failed operations: %+v", failed)
	}
}

// TestCrashDuringLifecycleJobs kills volumed with SIGKILL while
// CloudStack runs the job of each new kind, restarts it on the same data,
// and requires each operation completed, its call made once.
func TestCrashDuringLifecycleJobs(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.readyVolume("crash-life")
	snap := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/snapshots", nil).ID).Response.SnapshotID
	for _, tc := range []struct {
		command, method, path string
		body                  any
		check                 func(t *testing.T, op commands.Operation)
	}{
		{"createSnapshot", http.MethodPost, "/volumes/" + vol + "/snapshots", nil, func(t *testing.T, op commands.Operation) {
			var list []commands.Snapshot
			d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/snapshots", nil, &list)
			if len(list) != 2 || list[0].ID != op.Response.SnapshotID {
				t.Fatalf("snapshots %+v, want the first and %s", list, op.Response.SnapshotID)
			}
		}},
		{"resizeVolume", http.MethodPost, "/volumes/" + vol + "/resize", map[string]any{"size": 3 << 30}, func(t *testing.T, op commands.Operation) {
			if op.Response.Size != 3<<30 {
				t.Fatalf("resize %+v", op.Response)
			}
		}},
		{"createTags", http.MethodPut, "/volumes/" + vol + "/tags", map[string]any{"tags": map[string]string{"k": "v"}}, func(t *testing.T, _ commands.Operation) {
			var st commands.VolumeStatus
			d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
			if !maps.Equal(st.Tags, map[string]string{"k": "v"}) {
				t.Fatalf("tags %v", st.Tags)
			}
		}},
		{"revertSnapshot", http.MethodPost, "/volumes/" + vol + "/revert", map[string]string{"snapshot_id": snap}, func(t *testing.T, op commands.Operation) {
			if op.Response.Size != 1<<30 {
				t.Fatalf("revert %+v", op.Response)
			}
		}},
		{"deleteSnapshot", http.MethodDelete, "/snapshots/" + snap, nil, func(t *testing.T, _ commands.Operation) {
			d.mustCall(http.StatusNotFound, http.MethodGet, "/snapshots/"+snap, nil, nil)
		}},
		{"createVolume", http.MethodPost, "/volumes", nil, nil}, // replaced below: a volume from a snapshot
	} {
		if tc.command == "createVolume" {
			keep := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/snapshots", map[string]string{"name": "keep"}).ID).Response.SnapshotID
			tc.body = map[string]string{"name": "crash-clone", "snapshot_id": keep}
			tc.check = func(t *testing.T, op commands.Operation) {
				made, err := simAPI(sim).ListVolumes(context.Background(), csapi.ListFilter{Name: "crash-clone"})
				if err != nil || len(made) != 1 || made[0].ID != op.VolumeID {
					t.Fatalf("clones %+v (%v), want exactly %s", made, err, op.VolumeID)
				}
			}
		}
		t.Run(tc.command, func(t *testing.T) {
			before := sim.Stats().Calls[tc.command]
			// Held until volumed is dead: a job with a duration could end,
			// and the operation complete in attempt 1, before the kill.
			sim.SetFaults(cloudsim.Faults{JobHold: map[string]bool{tc.command: true}})
			op := d.submit(tc.method, tc.path, tc.body)
			testenv.Eventually(t, 30*time.Second, func() bool {
				var cur commands.Operation
				d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
				return cur.JobID != "" && cur.Status == commands.StatusExecuting
			}, "%s job started", tc.command)
			d.kill9()
			sim.SetFaults(cloudsim.Faults{})
			d.restart()
			done := d.completed(op.ID)
			if done.Attempts < 2 {
				t.Fatalf("attempts %d: the operation was not resumed after the crash", done.Attempts)
			}
			if n := sim.Stats().Calls[tc.command] - before; n != 1 {
				t.Fatalf("%s sent %d times, want 1", tc.command, n)
			}
			tc.check(t, done)
		})
	}
}
