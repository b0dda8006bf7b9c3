package csapi

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// jobRunner returns run: given a submit call's job id and error, it fails
// the test on the error and waits for the job.
func jobRunner(ctx context.Context, t *testing.T, c *Client) func(jobID string, err error) (Job, error) {
	return func(jobID string, err error) (Job, error) {
		t.Helper()
		if err != nil {
			t.Fatalf("submit: %v", err)
		}
		return c.WaitJob(ctx, jobID)
	}
}

// readyVolume creates a volume of gib GiB and attaches it to the remote VM,
// so it is Ready and has data.
func readyVolume(ctx context.Context, t *testing.T, c *Client, name string, gib int64) Volume {
	t.Helper()
	v := createVolume(ctx, t, c, name, gib)
	job, err := attach(ctx, t, c, v.ID, cloudsim.RemoteVMID, nil)
	if err != nil {
		t.Fatalf("attach %s: %v", name, err)
	}
	return *job.Volume
}

// TestSimSnapshotsRevertAndClone: snapshot a volume holding pattern A,
// write B, revert (refused while its VM runs), read A; a volume created
// from the snapshot reads A; list by volume, id and name; delete.
func TestSimSnapshotsRevertAndClone(t *testing.T) {
	sim, c := startSim(t, 10*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	run := jobRunner(ctx, t, c)
	a, b := bytes.Repeat([]byte("A"), 4096), bytes.Repeat([]byte("B"), 4096)
	v := readyVolume(ctx, t, c, "snap-src", 1)
	if err := sim.WriteVolume(v.ID, 1<<20, a); err != nil {
		t.Fatal(err)
	}

	snapID, jobID, err := c.CreateSnapshot(ctx, SnapshotParams{VolumeID: v.ID, Name: "op-1234"})
	job, err := run(jobID, err)
	if err != nil || job.Snapshot == nil || job.Snapshot.ID != snapID || job.Snapshot.State != SnapshotBackedUp ||
		job.Snapshot.VolumeID != v.ID || job.Snapshot.Size != 1<<30 || job.Snapshot.Name != "op-1234" || job.Snapshot.Created == "" {
		t.Fatalf("snapshot job = %+v (%s), %v", job, show(job.Snapshot), err)
	}
	for _, f := range []SnapshotFilter{{VolumeID: v.ID}, {ID: snapID}, {Name: "op-1234"}, {VolumeID: v.ID, Name: "op-1234"}} {
		snaps, err := c.ListSnapshots(ctx, f)
		if err != nil || len(snaps) != 1 || snaps[0] != *job.Snapshot {
			t.Errorf("ListSnapshots(%+v) = %s, %v", f, show(snaps), err)
		}
	}
	if snaps, err := c.ListSnapshots(ctx, SnapshotFilter{Name: "other"}); err != nil || len(snaps) != 0 {
		t.Errorf("ListSnapshots(other name) = %s, %v", show(snaps), err)
	}
	if err := sim.WriteVolume(v.ID, 1<<20, b); err != nil {
		t.Fatal(err)
	}

	_, err = run(c.RevertSnapshot(ctx, snapID))
	checkError(t, err, "revertSnapshot", 431, 0, "The VM the specified disk is attached to is not in the shutdown state.", false)

	job, err = run(c.StopVM(ctx, cloudsim.RemoteVMID, true))
	if err != nil || job.VM == nil || job.VM.State != "Stopped" {
		t.Fatalf("StopVM = %+v, %v", job, err)
	}
	job, err = run(c.RevertSnapshot(ctx, snapID))
	if err != nil || job.Snapshot == nil || job.Snapshot.ID != snapID {
		t.Fatalf("revert = %+v, %v", job, err)
	}
	if got, _ := sim.ReadVolume(v.ID, 1<<20, 4096); !bytes.Equal(got, a) {
		t.Fatalf("after revert the volume reads %.10q…", got)
	}

	id, jobID, err := c.CreateVolume(ctx, CreateParams{Name: "from-snap", SnapshotID: snapID})
	job, err = run(jobID, err)
	if err != nil || job.Volume == nil || job.Volume.ID != id || job.Volume.State != "Ready" || job.Volume.SnapshotID != snapID ||
		job.Volume.Size != 1<<30 || job.Volume.ZoneID != cloudsim.ZoneID {
		t.Fatalf("volume from snapshot = %s, %v", show(job.Volume), err)
	}
	if got, _ := sim.ReadVolume(id, 1<<20, 4096); !bytes.Equal(got, a) {
		t.Fatalf("the volume from the snapshot reads %.10q…", got)
	}

	if _, err := run(c.DeleteSnapshot(ctx, snapID)); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if _, err := c.GetSnapshot(ctx, snapID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetSnapshot of a deleted snapshot: %v, want ErrNotFound", err)
	}
	if _, err := c.GetSnapshot(ctx, "11111111-2222-4333-8444-555555555555"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetSnapshot of an unknown id: %v, want ErrNotFound", err)
	}
	_, err = run(c.DeleteSnapshot(ctx, snapID))
	checkError(t, err, "deleteSnapshot", 431, 0, "is already destroyed", false)

	// An unknown snapshot on create is refused in the HTTP call.
	_, _, err = c.CreateVolume(ctx, CreateParams{Name: "x", SnapshotID: "11111111-2222-4333-8444-555555555555"})
	checkError(t, err, "createVolume", 431, 9999, InvalidParameterText("createVolume", "snapshotid", "11111111-2222-4333-8444-555555555555"), false)
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("create from an unknown snapshot: %v, want ErrNotFound", err)
	}
}

// TestSimResizeTagsAndPower: resize (grow, refused shrink, shrink), tags
// set, listed and filtered (all of them must match), removed; VM start and
// stop jobs and their refusals.
func TestSimResizeTagsAndPower(t *testing.T) {
	_, c := startSim(t, 10*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	run := jobRunner(ctx, t, c)
	v := readyVolume(ctx, t, c, "resize-me", 1)
	other := createVolume(ctx, t, c, "other", 1)

	job, err := run(c.ResizeVolume(ctx, v.ID, 3, false))
	if err != nil || job.Volume == nil || job.Volume.Size != 3<<30 {
		t.Fatalf("grow = %s, %v", show(job.Volume), err)
	}
	_, err = run(c.ResizeVolume(ctx, v.ID, 2, false))
	checkError(t, err, "resizeVolume", 431, 0, "would shrink the volume.Need to sign off by supplying the shrinkok parameter", false)
	if job, err := run(c.ResizeVolume(ctx, v.ID, 2, true)); err != nil || job.Volume.Size != 2<<30 {
		t.Fatalf("shrink = %s, %v", show(job.Volume), err)
	}

	if _, err := run(c.CreateTags(ctx, v.ID, map[string]string{"env": "dr", "app": "db"})); err != nil {
		t.Fatalf("CreateTags: %v", err)
	}
	if _, err := run(c.CreateTags(ctx, other.ID, map[string]string{"env": "dr"})); err != nil {
		t.Fatalf("CreateTags: %v", err)
	}
	got, err := c.GetVolume(ctx, v.ID)
	if err != nil || len(got.Tags) != 2 || got.Tags["env"] != "dr" || got.Tags["app"] != "db" {
		t.Fatalf("GetVolume tags = %v, %v", got.Tags, err)
	}
	_, err = run(c.CreateTags(ctx, v.ID, map[string]string{"env": "x"}))
	checkError(t, err, "createTags", 530, 0, "tag env already on Volume with id "+v.ID, false)

	ids := func(f ListFilter) []string {
		vols, err := c.ListVolumes(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, v := range vols {
			out = append(out, v.ID)
		}
		slices.Sort(out)
		return out
	}
	both := []string{v.ID, other.ID}
	slices.Sort(both)
	for _, tc := range []struct {
		tags map[string]string
		want []string
	}{
		{map[string]string{"env": "dr"}, both},
		{map[string]string{"ENV": "DR", "app": "db"}, []string{v.ID}},
		{map[string]string{"env": "dr", "app": "web"}, nil},
	} {
		if got := ids(ListFilter{Tags: tc.tags}); !slices.Equal(got, tc.want) {
			t.Errorf("ListVolumes(tags %v) = %v, want %v", tc.tags, got, tc.want)
		}
	}

	if _, err := run(c.DeleteTags(ctx, v.ID, map[string]string{"app": "db"})); err != nil {
		t.Fatalf("DeleteTags: %v", err)
	}
	if got, _ := c.GetVolume(ctx, v.ID); len(got.Tags) != 1 || got.Tags["env"] != "dr" {
		t.Fatalf("tags after DeleteTags = %v", got.Tags)
	}
	_, err = run(c.DeleteTags(ctx, v.ID, map[string]string{"app": "db"}))
	checkError(t, err, "deleteTags", 530, 0, "Failed to delete tags", false)
	if _, err := c.DeleteTags(ctx, v.ID, nil); !errors.Is(err, ErrNoTags) {
		t.Errorf("DeleteTags(nil) = %v, want ErrNoTags", err)
	}

	_, err = run(c.StartVM(ctx, cloudsim.TestVMID))
	checkError(t, err, "startVirtualMachine", 533, 0, "Unable to create a deployment for VM", false)
	_, err = run(c.StartVM(ctx, cloudsim.RemoteVMID))
	checkError(t, err, "startVirtualMachine", 431, 0, "is already running", false)
	if job, err := run(c.StopVM(ctx, cloudsim.RemoteVMID, false)); err != nil || job.VM.State != "Stopped" {
		t.Fatalf("StopVM = %+v, %v", job, err)
	}
	if job, err := run(c.StartVM(ctx, cloudsim.RemoteVMID)); err != nil || job.VM.State != "Running" {
		t.Fatalf("StartVM = %+v, %v", job, err)
	}
}

// TestSimNewCallsUnderFaults: every new side-effecting call whose answer
// is lost after CloudStack did it is MaybeDone (and done: asking
// CloudStack finds it once); a 530 is retryable a few times and did
// nothing.
func TestSimNewCallsUnderFaults(t *testing.T) {
	sim, c := startSim(t, 10*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	run := jobRunner(ctx, t, c)
	v := readyVolume(ctx, t, c, "faults", 1)
	snapID, jobID, err := c.CreateSnapshot(ctx, SnapshotParams{VolumeID: v.ID, Name: "base"})
	if _, err := run(jobID, err); err != nil {
		t.Fatal(err)
	}
	fault := func(cmd, kind string) {
		t.Helper()
		if err := sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{cmd: {Rate: 1, Kind: kind}}}); err != nil {
			t.Fatal(err)
		}
	}
	clear := func() {
		t.Helper()
		if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("createSnapshot lost answer", func(t *testing.T) {
		fault("createSnapshot", cloudsim.ErrorKindDropAfter)
		_, _, err := c.CreateSnapshot(ctx, SnapshotParams{VolumeID: v.ID, Name: "op-lost"})
		clear()
		if !IsMaybeDone(err) || IsRetryable(err) {
			t.Fatalf("lost answer: %v, want MaybeDone", err)
		}
		snaps, err := c.ListSnapshots(ctx, SnapshotFilter{VolumeID: v.ID, Name: "op-lost"})
		if err != nil || len(snaps) != 1 {
			t.Fatalf("snapshots named op-lost: %s, %v; want exactly one", show(snaps), err)
		}
		// Its job runs on; the volume is Snapshotting until it ends.
		testenv.Eventually(t, 10*time.Second, func() bool {
			s, err := c.GetSnapshot(ctx, snaps[0].ID)
			return err == nil && s.State == SnapshotBackedUp
		}, "the snapshot of the lost answer is backed up")
	})
	t.Run("createSnapshot 530 retried", func(t *testing.T) {
		fault("createSnapshot", cloudsim.ErrorKind530)
		_, _, err := c.CreateSnapshot(ctx, SnapshotParams{VolumeID: v.ID, Name: "op-530"})
		clear()
		var e *Error
		if !errors.As(err, &e) || !e.Retryable || e.RetryLimit != Retries530 || e.MaybeDone {
			t.Fatalf("530: %v, want retryable with limit %d", err, Retries530)
		}
		if snaps, _ := c.ListSnapshots(ctx, SnapshotFilter{Name: "op-530"}); len(snaps) != 0 {
			t.Fatalf("a 530 made %d snapshots", len(snaps))
		}
		_, jobID, err := c.CreateSnapshot(ctx, SnapshotParams{VolumeID: v.ID, Name: "op-530"})
		if _, err := run(jobID, err); err != nil {
			t.Fatal(err)
		}
		if snaps, _ := c.ListSnapshots(ctx, SnapshotFilter{Name: "op-530"}); len(snaps) != 1 {
			t.Fatalf("after the retry: %d snapshots, want 1", len(snaps))
		}
	})

	calls := []struct {
		command string
		call    func() error
	}{
		{"resizeVolume", func() error { _, err := c.ResizeVolume(ctx, v.ID, 1, false); return err }},
		{"revertSnapshot", func() error { _, err := c.RevertSnapshot(ctx, snapID); return err }},
		{"createTags", func() error { _, err := c.CreateTags(ctx, v.ID, map[string]string{"k": "v"}); return err }},
		{"deleteTags", func() error { _, err := c.DeleteTags(ctx, v.ID, map[string]string{"k": "v"}); return err }},
		{"stopVirtualMachine", func() error { _, err := c.StopVM(ctx, cloudsim.TestVMID, false); return err }},
		{"startVirtualMachine", func() error { _, err := c.StartVM(ctx, cloudsim.RemoteVMID); return err }},
		{"deleteSnapshot", func() error { _, err := c.DeleteSnapshot(ctx, snapID); return err }},
		{"createVolume", func() error {
			_, _, err := c.CreateVolume(ctx, CreateParams{Name: "clone", SnapshotID: snapID})
			return err
		}},
	}
	for _, tc := range calls {
		t.Run(tc.command+" lost answer", func(t *testing.T) {
			fault(tc.command, cloudsim.ErrorKindDropAfter)
			err := tc.call()
			clear()
			var e *Error
			if !IsMaybeDone(err) || IsRetryable(err) || !errors.As(err, &e) || e.Command != tc.command {
				t.Fatalf("lost answer: %v, want MaybeDone for %s", err, tc.command)
			}
		})
		t.Run(tc.command+" dropped unanswered", func(t *testing.T) {
			fault(tc.command, cloudsim.ErrorKindDrop)
			err := tc.call()
			clear()
			// The simulator drops the connection after reading the request:
			// CloudStack may have seen it, so this too is MaybeDone.
			if !IsMaybeDone(err) {
				t.Fatalf("dropped: %v, want MaybeDone", err)
			}
		})
	}
	if got := sim.Stats().Calls["resizeVolume"]; got != 2 {
		t.Errorf("simulator saw %d resizeVolume calls, want 2 (no hidden retries)", got)
	}
}
