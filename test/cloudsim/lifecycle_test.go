package cloudsim_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// Patterns written into volumes: A before the snapshot, B after it.
var (
	patternA = bytes.Repeat([]byte("AAAA-pattern-"), 80)
	patternB = bytes.Repeat([]byte("BBBB-pattern-"), 80)
)

// farOffset is a second write position, far into a 1 GiB volume, so the
// volume's data has a hole between the two writes.
const farOffset = 700 << 20

// dataURL is the control endpoint of a volume's data.
func dataURL(s *cloudsim.Sim, volID string, query string) string {
	return s.ControlURL() + "/volumes/" + volID + "/data?" + query
}

// writeData writes b at offset through the control endpoint, as the test
// VM would, and returns the HTTP status.
func writeData(t *testing.T, s *cloudsim.Sim, volID string, offset int64, b []byte) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, dataURL(s, volID, fmt.Sprintf("offset=%d", offset)), bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("PUT data: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// readData reads n bytes at offset through the control endpoint.
func readData(t *testing.T, s *cloudsim.Sim, volID string, offset int64, n int) []byte {
	t.Helper()
	code, b := rawGet(t, dataURL(s, volID, fmt.Sprintf("offset=%d&length=%d", offset, n)))
	if code != http.StatusOK {
		t.Fatalf("GET data of %s: %d %s", volID, code, b)
	}
	return b
}

// writePattern writes p at 0 and at farOffset.
func writePattern(t *testing.T, s *cloudsim.Sim, volID string, p []byte) {
	t.Helper()
	for _, off := range []int64{0, farOffset} {
		if code := writeData(t, s, volID, off, p); code != http.StatusNoContent {
			t.Fatalf("write at %d: HTTP %d", off, code)
		}
	}
}

// checkPattern asserts the volume holds p at 0 and at farOffset.
func checkPattern(t *testing.T, s *cloudsim.Sim, volID string, p []byte, what string) {
	t.Helper()
	for _, off := range []int64{0, farOffset} {
		if got := readData(t, s, volID, off, len(p)); !bytes.Equal(got, p) {
			t.Fatalf("%s: at %d read %.20q…, want %.20q…", what, off, got, p)
		}
	}
}

// runJob submits through call and waits; it returns the job's error text
// and code ("" and 0 on success).
func runJob(t *testing.T, cs *cloudstack.CloudStackClient, jobID string, err error) (int, string) {
	t.Helper()
	if err != nil {
		t.Fatalf("submit: %v", err)
	}
	code, text := jobError(t, waitJob(t, cs, jobID))
	return code, text
}

// snapshot takes a named snapshot of a volume and waits for it.
func snapshot(t *testing.T, cs *cloudstack.CloudStackClient, volID, name string) string {
	t.Helper()
	p := cs.Snapshot.NewCreateSnapshotParams(volID)
	p.SetName(name)
	r, err := cs.Snapshot.CreateSnapshot(p)
	if _, text := runJob(t, cs, r.JobID, err); text != "" {
		t.Fatalf("createSnapshot: %s", text)
	}
	return r.Id
}

func setVMState(t *testing.T, cs *cloudstack.CloudStackClient, vmID string, start bool) {
	t.Helper()
	var jobID string
	var err error
	if start {
		var r *cloudstack.StartVirtualMachineResponse
		r, err = cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(vmID))
		if r != nil {
			jobID = r.JobID
		}
	} else {
		var r *cloudstack.StopVirtualMachineResponse
		r, err = cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams(vmID))
		if r != nil {
			jobID = r.JobID
		}
	}
	if _, text := runJob(t, cs, jobID, err); text != "" {
		t.Fatalf("start=%v %s: %s", start, vmID, text)
	}
}

// allocatedBytes is the disk space a file uses.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestSnapshotDataRoundTrip: pattern A, snapshot, pattern B, revert (VM
// stopped), pattern A again; a volume made from the snapshot reads A; the
// snapshot's copy is sparse.
func TestSnapshotDataRoundTrip(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "data", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	writePattern(t, s, vol, patternA)

	snapID := snapshot(t, cs, vol, "snap-a")
	lp := cs.Snapshot.NewListSnapshotsParams()
	lp.SetVolumeid(vol)
	list, err := cs.Snapshot.ListSnapshots(lp)
	if err != nil || list.Count != 1 {
		t.Fatalf("listSnapshots = %+v, %v", list, err)
	}
	sn := list.Snapshots[0]
	if sn.Id != snapID || sn.Name != "snap-a" || sn.State != "BackedUp" || sn.Volumeid != vol || sn.Virtualsize != 1<<30 ||
		sn.Snapshottype != "MANUAL" || sn.Zoneid != cloudsim.ZoneID || !sn.Revertable {
		t.Fatalf("snapshot = %+v", sn)
	}
	files, _ := filepath.Glob(filepath.Join(s.StateDir(), "disks", "snap-"+snapID+".img"))
	if len(files) != 1 {
		t.Fatalf("snapshot file: %v", files)
	}
	if got := allocatedBytes(t, files[0]); got > 8<<20 {
		t.Fatalf("snapshot of 1 GiB with 2 KiB of data uses %d bytes: not sparse", got)
	}

	writePattern(t, s, vol, patternB)
	checkPattern(t, s, vol, patternB, "after writing B")

	// Attached to a Running VM: refused.
	r, err := cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(snapID))
	if code, text := runJob(t, cs, r.JobID, err); code != 431 || text != "The VM the specified disk is attached to is not in the shutdown state." {
		t.Fatalf("revert with the VM running: %d %q", code, text)
	}
	checkPattern(t, s, vol, patternB, "after a refused revert")

	setVMState(t, cs, cloudsim.RemoteVMID, false)
	r, err = cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(snapID))
	if _, text := runJob(t, cs, r.JobID, err); text != "" {
		t.Fatalf("revert: %s", text)
	}
	checkPattern(t, s, vol, patternA, "after revert")

	// A volume from the snapshot alone: zone, offering and size are the
	// snapshot's.
	cp := cs.Volume.NewCreateVolumeParams()
	cp.SetName("from-snap")
	cp.SetSnapshotid(snapID)
	created, err := cs.Volume.CreateVolume(cp)
	if _, text := runJob(t, cs, created.JobID, err); text != "" {
		t.Fatalf("createVolume from snapshot: %s", text)
	}
	v, _, err := cs.Volume.GetVolumeByID(created.Id)
	if err != nil || v.State != "Ready" || v.Size != 1<<30 || v.Snapshotid != snapID || v.Zoneid != cloudsim.ZoneID ||
		v.Diskofferingid != cloudsim.CustomOfferingID || v.Virtualmachineid != "" {
		t.Fatalf("volume from snapshot = %+v, %v", v, err)
	}
	checkPattern(t, s, created.Id, patternA, "volume from the snapshot")
	// It is its own copy.
	writePattern(t, s, created.Id, patternB)
	checkPattern(t, s, vol, patternA, "original after writing the copy")

	// Delete: gone from the list, the file removed.
	dr, err := cs.Snapshot.DeleteSnapshot(cs.Snapshot.NewDeleteSnapshotParams(snapID))
	if _, text := runJob(t, cs, dr.JobID, err); text != "" {
		t.Fatalf("deleteSnapshot: %s", text)
	}
	if list, err := cs.Snapshot.ListSnapshots(lp); err != nil || list.Count != 0 {
		t.Fatalf("listSnapshots after delete = %+v, %v", list, err)
	}
	if _, err := os.Stat(files[0]); !os.IsNotExist(err) {
		t.Fatalf("snapshot file after delete: %v", err)
	}
}

// TestAsyncClientNewCommands drives every new command with cloudstack-go's
// NewAsyncClient, which waits for jobs and parses their results itself.
func TestAsyncClientNewCommands(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := asyncClient(s)
	created, err := cs.Volume.CreateVolume(createParams(cs, "async-new", 2))
	if err != nil {
		t.Fatal(err)
	}
	vol := created.Id

	rp := cs.Volume.NewResizeVolumeParams(vol)
	rp.SetSize(3)
	resized, err := cs.Volume.ResizeVolume(rp)
	if err != nil || resized.Size != 3<<30 || resized.Id != vol || resized.State != "Allocated" {
		t.Fatalf("resizeVolume of an Allocated volume = %+v, %v", resized, err)
	}
	if _, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(vol, cloudsim.RemoteVMID)); err != nil {
		t.Fatal(err)
	}

	snap, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(vol))
	if err != nil || snap.State != "BackedUp" || snap.Volumeid != vol || snap.Virtualsize != 3<<30 {
		t.Fatalf("createSnapshot = %+v, %v", snap, err)
	}
	// CloudStack's default name: VM name, volume name, UTC time.
	if !strings.HasPrefix(snap.Name, "remote-vm_async-new_"+time.Now().UTC().Format("2006")) {
		t.Fatalf("default snapshot name %q", snap.Name)
	}

	tags, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{vol}, "Volume", map[string]string{"team": "dr"}))
	if err != nil || !tags.Success {
		t.Fatalf("createTags = %+v, %v", tags, err)
	}
	dt := cs.Resourcetags.NewDeleteTagsParams([]string{vol}, "volume")
	dt.SetTags(map[string]string{"team": ""})
	if r, err := cs.Resourcetags.DeleteTags(dt); err != nil || !r.Success {
		t.Fatalf("deleteTags = %+v, %v", r, err)
	}

	stop, err := cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams(cloudsim.RemoteVMID))
	if err != nil || stop.State != "Stopped" {
		t.Fatalf("stopVirtualMachine = %+v, %v", stop, err)
	}
	rev, err := cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(snap.Id))
	if err != nil || rev.Id != snap.Id {
		t.Fatalf("revertSnapshot = %+v, %v", rev, err)
	}
	del, err := cs.Snapshot.DeleteSnapshot(cs.Snapshot.NewDeleteSnapshotParams(snap.Id))
	if err != nil || !del.Success {
		t.Fatalf("deleteSnapshot = %+v, %v", del, err)
	}
	start, err := cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(cloudsim.RemoteVMID))
	if err != nil || start.State != "Running" {
		t.Fatalf("startVirtualMachine = %+v, %v", start, err)
	}
}

// TestResizeVolume: an Allocated volume changes size in the database; a
// Ready one's backing file is truncated; shrinking needs shrinkok.
func TestResizeVolume(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "grow", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	writeData(t, s, vol, 0, patternA)
	resize := func(gb int64, shrink bool) (int, string) {
		p := cs.Volume.NewResizeVolumeParams(vol)
		p.SetSize(gb)
		if shrink {
			p.SetShrinkok(true)
		}
		r, err := cs.Volume.ResizeVolume(p)
		return runJob(t, cs, r.JobID, err)
	}
	// While the job runs the volume is Resizing; a second resize is refused.
	if err := s.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"resizeVolume": cloudsim.Duration(300 * time.Millisecond)}}); err != nil {
		t.Fatal(err)
	}
	p := cs.Volume.NewResizeVolumeParams(vol)
	p.SetSize(3)
	first, err := cs.Volume.ResizeVolume(p)
	if err != nil {
		t.Fatal(err)
	}
	if v, _, _ := cs.Volume.GetVolumeByID(vol); v.State != "Resizing" {
		t.Fatalf("during a resize: %s", v.State)
	}
	if err := s.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	if code, text := resize(4, false); code != 431 || text != "Volume should be in ready or allocated state before attempting a resize. Volume "+vol+" is in state Resizing." {
		t.Fatalf("resize during a resize: %d %q", code, text)
	}
	if _, text := runJob(t, cs, first.JobID, nil); text != "" {
		t.Fatal(text)
	}
	v, _, _ := cs.Volume.GetVolumeByID(vol)
	if v.Size != 3<<30 || v.State != "Ready" {
		t.Fatalf("after growing: %+v", v)
	}
	if !bytes.Equal(readData(t, s, vol, 0, len(patternA)), patternA) {
		t.Fatal("data lost by growing")
	}
	if code := writeData(t, s, vol, 3<<30-4, []byte("tail")); code != http.StatusNoContent {
		t.Fatalf("write at the new end: %d", code)
	}
	if code, text := resize(2, false); code != 431 || text != fmt.Sprintf("Going from existing size of %d to size of %d would shrink the volume."+
		"Need to sign off by supplying the shrinkok parameter with value of true.", int64(3<<30), int64(2<<30)) {
		t.Fatalf("shrink without shrinkok: %d %q", code, text)
	}
	if _, text := resize(2, true); text != "" {
		t.Fatal(text)
	}
	if v, _, _ := cs.Volume.GetVolumeByID(vol); v.Size != 2<<30 {
		t.Fatalf("after shrinking: %d", v.Size)
	}
	if code := writeData(t, s, vol, 3<<30-4, []byte("tail")); code != http.StatusBadRequest {
		t.Fatalf("write past the shrunk end: %d, want 400", code)
	}
}

// TestTagsRoundTrip: tags on volumes, in volume answers, listTags, the
// listVolumes tags filter (any of the pairs, as CloudStack's join), and
// their removal.
func TestTagsRoundTrip(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	a := createVolume(t, cs, "tag-a", 1)
	b := createVolume(t, cs, "tag-b", 1)
	create := func(ids []string, tags map[string]string) {
		t.Helper()
		r, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams(ids, "Volume", tags))
		if _, text := runJob(t, cs, r.JobID, err); text != "" {
			t.Fatalf("createTags: %s", text)
		}
	}
	create([]string{a, b}, map[string]string{"env": "test"})
	create([]string{a}, map[string]string{"app": "db", "tier": "gold"})

	v, _, err := cs.Volume.GetVolumeByID(a)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, tg := range v.Tags {
		if tg.Resourcetype != "Volume" || tg.Resourceid != a {
			t.Fatalf("tag %+v", tg)
		}
		got[tg.Key] = tg.Value
	}
	if fmt.Sprint(got) != fmt.Sprint(map[string]string{"app": "db", "env": "test", "tier": "gold"}) {
		t.Fatalf("tags of a = %v", got)
	}

	byTags := func(tags map[string]string) []string {
		t.Helper()
		p := cs.Volume.NewListVolumesParams()
		p.SetTags(tags)
		r, err := cs.Volume.ListVolumes(p)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, v := range r.Volumes {
			ids = append(ids, v.Id)
		}
		return ids
	}
	if ids := byTags(map[string]string{"ENV": "Test"}); !slices.Equal(ids, []string{a, b}) {
		t.Fatalf("env=test (any case) lists %v", ids)
	}
	if ids := byTags(map[string]string{"app": "db"}); !slices.Equal(ids, []string{a}) {
		t.Fatalf("app=db lists %v", ids)
	}
	if ids := byTags(map[string]string{"app": "web"}); len(ids) != 0 {
		t.Fatalf("app=web lists %v", ids)
	}

	lt := cs.Resourcetags.NewListTagsParams()
	lt.SetResourceid(a)
	lt.SetResourcetype("Volume")
	tl, err := cs.Resourcetags.ListTags(lt)
	if err != nil || tl.Count != 3 {
		t.Fatalf("listTags = %+v, %v", tl, err)
	}

	// Remove one tag by key and value, one by key alone.
	dt := cs.Resourcetags.NewDeleteTagsParams([]string{a}, "Volume")
	dt.SetTags(map[string]string{"app": "db", "tier": ""})
	r, err := cs.Resourcetags.DeleteTags(dt)
	if _, text := runJob(t, cs, r.JobID, err); text != "" {
		t.Fatalf("deleteTags: %s", text)
	}
	if tl, _ := cs.Resourcetags.ListTags(lt); tl.Count != 1 || tl.Tags[0].Key != "env" {
		t.Fatalf("after deleteTags: %+v", tl)
	}
	// Deleting a volume drops its tags.
	if _, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(b)); err != nil {
		t.Fatal(err)
	}
	all, err := cs.Resourcetags.ListTags(cs.Resourcetags.NewListTagsParams())
	if err != nil || all.Count != 1 || all.Tags[0].Resourceid != a {
		t.Fatalf("all tags after deleting b = %+v, %v", all, err)
	}
}

// TestVMStartStop: start and stop are jobs; the VM is Starting or Stopping
// while they run; an injected job failure leaves it as it was; stopping a
// Stopped VM succeeds; starting a Running one, or one without a root disk,
// is refused.
func TestVMStartStop(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	state := func(id string) string {
		vm, _, err := cs.VirtualMachine.GetVirtualMachineByID(id)
		if err != nil {
			t.Fatal(err)
		}
		return vm.State
	}
	if err := s.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"*": cloudsim.Duration(200 * time.Millisecond)}}); err != nil {
		t.Fatal(err)
	}
	sp := cs.VirtualMachine.NewStopVirtualMachineParams(cloudsim.RemoteVMID)
	sp.SetForced(true)
	stop, err := cs.VirtualMachine.StopVirtualMachine(sp)
	if err != nil {
		t.Fatal(err)
	}
	if st := state(cloudsim.RemoteVMID); st != "Stopping" {
		t.Fatalf("during stop: %s", st)
	}
	if _, text := runJob(t, cs, stop.JobID, nil); text != "" || state(cloudsim.RemoteVMID) != "Stopped" {
		t.Fatalf("stop: %q, state %s", text, state(cloudsim.RemoteVMID))
	}
	start, err := cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(cloudsim.RemoteVMID))
	if err != nil {
		t.Fatal(err)
	}
	if st := state(cloudsim.RemoteVMID); st != "Starting" {
		t.Fatalf("during start: %s", st)
	}
	if _, text := runJob(t, cs, start.JobID, nil); text != "" || state(cloudsim.RemoteVMID) != "Running" {
		t.Fatalf("start: %q, state %s", text, state(cloudsim.RemoteVMID))
	}
	if err := s.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		vm       string
		start    bool
		code     int
		text     string
		endState string
	}{
		{"start a running VM", cloudsim.RemoteVMID, true, 431,
			"The virtual machine " + cloudsim.RemoteVMID + " (remote-vm) is already running", "Running"},
		{"start a VM without a root disk", cloudsim.TestVMID, true, 533,
			"Unable to create a deployment for VM[User|i-2-9d8c-VM]", "Stopped"},
		{"stop a stopped VM", cloudsim.TestVMID, false, 0, "", "Stopped"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var jobID string
			var err error
			if tc.start {
				r, e := cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(tc.vm))
				jobID, err = r.JobID, e
			} else {
				r, e := cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams(tc.vm))
				jobID, err = r.JobID, e
			}
			if code, text := runJob(t, cs, jobID, err); code != tc.code || text != tc.text {
				t.Fatalf("job: %d %q, want %d %q", code, text, tc.code, tc.text)
			}
			if st := state(tc.vm); st != tc.endState {
				t.Fatalf("state %s, want %s", st, tc.endState)
			}
		})
	}

	t.Run("injected job failure", func(t *testing.T) {
		if err := s.SetFaults(cloudsim.Faults{JobFailureRate: map[string]float64{"stopVirtualMachine": 1}}); err != nil {
			t.Fatal(err)
		}
		r, err := cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams(cloudsim.RemoteVMID))
		if code, _ := runJob(t, cs, r.JobID, err); code != 530 || state(cloudsim.RemoteVMID) != "Running" {
			t.Fatalf("failed stop: %d, state %s", code, state(cloudsim.RemoteVMID))
		}
	})
}

// TestNewCommandErrors checks each refusal's code and text, in the HTTP
// call or in the job as CloudStack does.
func TestNewCommandErrors(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	const unknown = "00000000-0000-0000-0000-000000000000"
	allocated := createVolume(t, cs, "allocated", 1)
	ready := createVolume(t, cs, "ready", 1)
	if _, text := attach(t, cs, ready, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	snapID := snapshot(t, cs, ready, "s1")
	// A deleted snapshot of a detached (Ready) volume.
	detached := createVolume(t, cs, "detached", 1)
	if _, text := attach(t, cs, detached, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	dp := cs.Volume.NewDetachVolumeParams()
	dp.SetId(detached)
	if r, err := cs.Volume.DetachVolume(dp); err != nil {
		t.Fatal(err)
	} else if _, text := runJob(t, cs, r.JobID, nil); text != "" {
		t.Fatal(text)
	}
	gone := snapshot(t, cs, detached, "gone")
	if r, err := cs.Snapshot.DeleteSnapshot(cs.Snapshot.NewDeleteSnapshotParams(gone)); err != nil {
		t.Fatal(err)
	} else if _, text := runJob(t, cs, r.JobID, nil); text != "" {
		t.Fatal(text)
	}
	deletedVol := createVolume(t, cs, "deleted", 1)
	if _, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(deletedVol)); err != nil {
		t.Fatal(err)
	}
	tag := func(id string, tags map[string]string) func() (string, error) {
		return func() (string, error) {
			r, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{id}, "Volume", tags))
			if err != nil {
				return "", err
			}
			return r.JobID, nil
		}
	}
	if _, text := runJob(t, cs, mustJob(t, tag(ready, map[string]string{"k": "v"})), nil); text != "" {
		t.Fatal(text)
	}

	t.Run("http", func(t *testing.T) {
		tests := []struct {
			name string
			call func() error
			want string
		}{
			{"snapshot of an Allocated volume", func() error {
				_, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(allocated))
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 4350): VolumeId: "},
			{"snapshot of an Allocated volume (text)", func() error {
				_, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(allocated))
				return err
			}, " is not in Ready state but Allocated. Cannot take snapshot."},
			{"snapshot of an unknown volume", func() error {
				_, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(unknown))
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 9999): Unable to execute API command createsnapshot due to invalid value. Invalid parameter volumeid value=" + unknown},
			{"snapshot of a deleted volume", func() error {
				_, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(deletedVol))
				return err
			}, "doesn't exist"},
			{"volume from an unknown snapshot", func() error {
				p := cs.Volume.NewCreateVolumeParams()
				p.SetSnapshotid(unknown)
				_, err := cs.Volume.CreateVolume(p)
				return err
			}, "Invalid parameter snapshotid value=" + unknown},
			{"volume from a data-disk snapshot with an offering", func() error {
				p := createParams(cs, "x", 1)
				p.SetSnapshotid(snapID)
				_, err := cs.Volume.CreateVolume(p)
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 4350): Disk Offering ID cannot be passed whilst creating volume from snapshot other than ROOT disk snapshots"},
			{"volume from a deleted snapshot", func() error {
				p := cs.Volume.NewCreateVolumeParams()
				p.SetSnapshotid(gone)
				_, err := cs.Volume.CreateVolume(p)
				return err
			}, "is not in BackedUp state yet and can't be used for volume creation"},
			{"list an unknown snapshot", func() error {
				p := cs.Snapshot.NewListSnapshotsParams()
				p.SetId(unknown)
				_, err := cs.Snapshot.ListSnapshots(p)
				return err
			}, "Invalid parameter id value=" + unknown},
			{"revert an unknown snapshot", func() error {
				_, err := cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(unknown))
				return err
			}, "Unable to execute API command revertsnapshot due to invalid value. Invalid parameter id value=" + unknown},
			{"resize an unknown volume", func() error {
				_, err := cs.Volume.ResizeVolume(cs.Volume.NewResizeVolumeParams(unknown))
				return err
			}, "Invalid parameter id value=" + unknown},
			{"tags without resource ids", func() error {
				_, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams(nil, "Volume", map[string]string{"k": "v"}))
				return err
			}, "Unable to execute API command createtags due to missing parameter resourceids"},
			{"tags without tags", func() error {
				_, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{ready}, "Volume", nil))
				return err
			}, "Unable to execute API command createtags due to missing parameter tags"},
			{"listTags of a bad type", func() error {
				p := cs.Resourcetags.NewListTagsParams()
				p.SetResourcetype("Frobnicator")
				_, err := cs.Resourcetags.ListTags(p)
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 4350): Invalid resource type Frobnicator"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				if err := tc.call(); err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.want)
				}
			})
		}
		// A deleted snapshot's id still resolves, and lists as empty.
		p := cs.Snapshot.NewListSnapshotsParams()
		p.SetId(gone)
		if r, err := cs.Snapshot.ListSnapshots(p); err != nil || r.Count != 0 {
			t.Fatalf("list a deleted snapshot = %+v, %v", r, err)
		}
	})

	t.Run("jobs", func(t *testing.T) {
		resize := func(id string, gb int64) func() (string, error) {
			return func() (string, error) {
				p := cs.Volume.NewResizeVolumeParams(id)
				p.SetSize(gb)
				r, err := cs.Volume.ResizeVolume(p)
				if err != nil {
					return "", err
				}
				return r.JobID, nil
			}
		}
		deleteTags := func(id string, typ string, tags map[string]string) func() (string, error) {
			return func() (string, error) {
				p := cs.Resourcetags.NewDeleteTagsParams([]string{id}, typ)
				p.SetTags(tags)
				r, err := cs.Resourcetags.DeleteTags(p)
				if err != nil {
					return "", err
				}
				return r.JobID, nil
			}
		}
		snapJob := func(cmd, id string) func() (string, error) {
			return func() (string, error) {
				var out struct {
					JobID string `json:"jobid"`
				}
				p := &cloudstack.CustomServiceParams{}
				p.SetParam("id", id)
				err := cs.Custom.(*cloudstack.CustomService).CustomRequest(cmd, p, &out)
				return out.JobID, err
			}
		}
		tests := []struct {
			name string
			run  func() (string, error)
			code int
			text string
		}{
			{"revert with the VM running", snapJob("revertSnapshot", snapID), 431, "The VM the specified disk is attached to is not in the shutdown state."},
			{"revert a deleted snapshot", snapJob("revertSnapshot", gone), 530, "snapshot gone [" + gone + "] does not exists in data store"},
			{"delete a deleted snapshot", snapJob("deleteSnapshot", gone), 431, "is already destroyed"},
			{"resize a deleted volume", resize(deletedVol, 2), 431, "No such volume"},
			{"resize out of range", resize(ready, 1025), 431, "Volume size: 1025 GB is out of allowed range. Min: 1. Max: 1024"},
			{"tag twice", tag(ready, map[string]string{"K": "w"}), 530, "tag K already on Volume with id " + ready},
			{"tag with an empty value", tag(ready, map[string]string{"e": ""}), 431, "Value for the key e is either null or empty"},
			{"tag a deleted volume", tag(deletedVol, map[string]string{"a": "b"}), 431, "Unable to find resource by uuid " + deletedVol + " and type Volume"},
			{"tag a bad type", func() (string, error) {
				r, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{ready}, "Frob", map[string]string{"a": "b"}))
				if err != nil {
					return "", err
				}
				return r.JobID, nil
			}, 431, "Invalid resource type Frob"},
			{"delete a tag it does not have", deleteTags(ready, "Volume", map[string]string{"nope": ""}), 530, "Failed to delete tags"},
			{"delete a tag of another value", deleteTags(ready, "Volume", map[string]string{"k": "other"}), 530, "Failed to delete tags"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				code, text := runJob(t, cs, mustJob(t, tc.run), nil)
				if code != tc.code || !strings.Contains(text, tc.text) {
					t.Fatalf("job error = %d %q, want %d containing %q", code, text, tc.code, tc.text)
				}
			})
		}
	})

	t.Run("pending snapshot", func(t *testing.T) {
		if err := s.SetFaults(cloudsim.Faults{JobHangRate: map[string]float64{"createSnapshot": 1}}); err != nil {
			t.Fatal(err)
		}
		r, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(ready))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetFaults(cloudsim.Faults{}); err != nil {
			t.Fatal(err)
		}
		// The volume is Snapshotting while the job runs: no second
		// snapshot, no attach.
		if v, _, err := cs.Volume.GetVolumeByID(ready); err != nil || v.State != "Snapshotting" {
			t.Fatalf("volume during a snapshot: %+v, %v", v, err)
		}
		if _, err := cs.Snapshot.CreateSnapshot(cs.Snapshot.NewCreateSnapshotParams(ready)); err == nil ||
			!strings.Contains(err.Error(), "is not in Ready state but Snapshotting. Cannot take snapshot.") {
			t.Fatalf("second snapshot during a snapshot: %v", err)
		}
		p := cs.Volume.NewResizeVolumeParams(ready)
		p.SetSize(2)
		rr, err := cs.Volume.ResizeVolume(p)
		if code, text := runJob(t, cs, rr.JobID, err); code != 530 ||
			text != "There is/are unbacked up snapshot(s) on this volume, resize volume is not permitted, please try again later." {
			t.Fatalf("resize during a snapshot: %d %q", code, text)
		}
		dr, err := cs.Snapshot.DeleteSnapshot(cs.Snapshot.NewDeleteSnapshotParams(r.Id))
		if code, text := runJob(t, cs, dr.JobID, err); code != 530 || !strings.Contains(text, "due to it is in Creating Status") {
			t.Fatalf("delete a snapshot being taken: %d %q", code, text)
		}
		cp := cs.Volume.NewCreateVolumeParams()
		cp.SetSnapshotid(r.Id)
		if _, err := cs.Volume.CreateVolume(cp); err == nil || !strings.Contains(err.Error(), "is not in BackedUp state yet") {
			t.Fatalf("volume from a snapshot being taken: %v", err)
		}
	})
}

// mustJob runs a submit function and fails the test on an HTTP error.
func mustJob(t *testing.T, submit func() (string, error)) string {
	t.Helper()
	id, err := submit()
	if err != nil {
		t.Fatalf("submit: %v", err)
	}
	return id
}

// TestDataControlEndpoint: PUT and GET of a volume's bytes, and their
// refusals.
func TestDataControlEndpoint(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	allocated := createVolume(t, cs, "alloc", 1)
	vol := createVolume(t, cs, "ctl", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	// A Ready volume reads zeros before any write.
	if b := readData(t, s, vol, 100, 8); !bytes.Equal(b, make([]byte, 8)) {
		t.Fatalf("fresh volume reads %q", b)
	}
	if code := writeData(t, s, vol, 1<<30-5, []byte("end!!")); code != http.StatusNoContent {
		t.Fatalf("write at the end: %d", code)
	}
	if b := readData(t, s, vol, 1<<30-5, 5); string(b) != "end!!" {
		t.Fatalf("read back %q", b)
	}
	if b, err := s.ReadVolume(vol, 1<<30-5, 5); err != nil || string(b) != "end!!" {
		t.Fatalf("ReadVolume = %q, %v", b, err)
	}
	tests := []struct {
		name  string
		do    func() int
		wants int
	}{
		{"write past the end", func() int { return writeData(t, s, vol, 1<<30-4, []byte("12345")) }, http.StatusBadRequest},
		{"write an Allocated volume", func() int { return writeData(t, s, allocated, 0, []byte("x")) }, http.StatusConflict},
		{"write an unknown volume", func() int { return writeData(t, s, "nope", 0, []byte("x")) }, http.StatusNotFound},
		{"read without length", func() int { c, _ := rawGet(t, dataURL(s, vol, "offset=0")); return c }, http.StatusBadRequest},
		{"read a bad offset", func() int { c, _ := rawGet(t, dataURL(s, vol, "offset=-1&length=1")); return c }, http.StatusBadRequest},
		{"read too much", func() int {
			c, _ := rawGet(t, dataURL(s, vol, fmt.Sprintf("offset=0&length=%d", cloudsim.MaxDataRead+1)))
			return c
		}, http.StatusBadRequest},
		{"delete", func() int {
			req, _ := http.NewRequest(http.MethodDelete, dataURL(s, vol, ""), nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}, http.StatusMethodNotAllowed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.do(); got != tc.wants {
				t.Fatalf("HTTP %d, want %d", got, tc.wants)
			}
		})
	}
}

// TestLifecyclePersistence: snapshots (with their data), tags and sizes
// survive a restart on the same state directory.
func TestLifecyclePersistence(t *testing.T) {
	dir := t.TempDir()
	cfg := cloudsim.Config{Listen: "127.0.0.1:0", StateDir: dir, LocalDevices: cloudsim.LocalDevicesOff, JobDuration: 10 * time.Millisecond}
	s1, err := cloudsim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	cs := syncClient(s1)
	vol := createVolume(t, cs, "persist", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	writePattern(t, s1, vol, patternA)
	snapID := snapshot(t, cs, vol, "kept")
	writePattern(t, s1, vol, patternB)
	p := cs.Volume.NewResizeVolumeParams(vol)
	p.SetSize(2)
	r, err := cs.Volume.ResizeVolume(p)
	if _, text := runJob(t, cs, r.JobID, err); text != "" {
		t.Fatal(text)
	}
	tr, err := cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{vol}, "Volume", map[string]string{"keep": "me"}))
	if _, text := runJob(t, cs, tr.JobID, err); text != "" {
		t.Fatal(text)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}

	s2 := startSim(t, cfg)
	cs2 := syncClient(s2)
	v, _, err := cs2.Volume.GetVolumeByID(vol)
	if err != nil || v.Size != 2<<30 || len(v.Tags) != 1 || v.Tags[0].Key != "keep" || v.Tags[0].Value != "me" {
		t.Fatalf("volume after restart = %+v, %v", v, err)
	}
	lp := cs2.Snapshot.NewListSnapshotsParams()
	lp.SetName("kept")
	if l, err := cs2.Snapshot.ListSnapshots(lp); err != nil || l.Count != 1 || l.Snapshots[0].Id != snapID || l.Snapshots[0].Virtualsize != 1<<30 {
		t.Fatalf("snapshots after restart = %+v, %v", l, err)
	}
	checkPattern(t, s2, vol, patternB, "after restart")
	setVMState(t, cs2, cloudsim.RemoteVMID, false)
	rv, err := cs2.Snapshot.RevertSnapshot(cs2.Snapshot.NewRevertSnapshotParams(snapID))
	if _, text := runJob(t, cs2, rv.JobID, err); text != "" {
		t.Fatal(text)
	}
	checkPattern(t, s2, vol, patternA, "reverted after restart")
	// The revert brought the snapshot's size back (SnapshotManagerImpl).
	if v, _, _ := cs2.Volume.GetVolumeByID(vol); v.Size != 1<<30 {
		t.Fatalf("size after revert = %d", v.Size)
	}
}

// TestCreateSnapshotFaults: an answer lost after the snapshot was made
// leaves exactly one; a 530 makes none.
func TestCreateSnapshotFaults(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "faults", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	count := func(name string) int {
		p := cs.Snapshot.NewListSnapshotsParams()
		p.SetVolumeid(vol)
		p.SetName(name)
		l, err := cs.Snapshot.ListSnapshots(p)
		if err != nil {
			t.Fatal(err)
		}
		return l.Count
	}
	take := func(name string) error {
		p := cs.Snapshot.NewCreateSnapshotParams(vol)
		p.SetName(name)
		_, err := cs.Snapshot.CreateSnapshot(p)
		return err
	}
	for _, tc := range []struct {
		kind string
		want int
	}{{cloudsim.ErrorKindDropAfter, 1}, {cloudsim.ErrorKindDrop, 0}, {cloudsim.ErrorKind530, 0}} {
		t.Run(tc.kind, func(t *testing.T) {
			if err := s.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"createSnapshot": {Rate: 1, Kind: tc.kind}}}); err != nil {
				t.Fatal(err)
			}
			if err := take("f-" + tc.kind); err == nil {
				t.Fatal("createSnapshot succeeded under the fault")
			}
			if err := s.SetFaults(cloudsim.Faults{}); err != nil {
				t.Fatal(err)
			}
			// A job of a lost answer runs on: the volume is Snapshotting
			// until it ends.
			testenv.Eventually(t, 10*time.Second, func() bool { return s.Stats().PendingJobs == 0 }, "jobs end")
			if n := count("f-" + tc.kind); n != tc.want {
				t.Fatalf("%d snapshots named f-%s, want %d", n, tc.kind, tc.want)
			}
		})
	}
	t.Run("job failure", func(t *testing.T) {
		if err := s.SetFaults(cloudsim.Faults{JobFailureRate: map[string]float64{"createSnapshot": 1}}); err != nil {
			t.Fatal(err)
		}
		p := cs.Snapshot.NewCreateSnapshotParams(vol)
		p.SetName("failed")
		r, err := cs.Snapshot.CreateSnapshot(p)
		if code, _ := runJob(t, cs, r.JobID, err); code != 530 {
			t.Fatalf("failed job code %d", code)
		}
		s.SetFaults(cloudsim.Faults{})
		l, err := cs.Snapshot.ListSnapshots(cs.Snapshot.NewListSnapshotsParams())
		if err != nil {
			t.Fatal(err)
		}
		for _, sn := range l.Snapshots {
			if sn.Name == "failed" && sn.State != "Error" {
				t.Fatalf("failed snapshot in state %s, want Error", sn.State)
			}
		}
	})
}

// TestCreateSnapshotQuiescevm sends quiescevm with cloudstack-go: false
// takes the snapshot; true is allocated, then its job fails with
// CloudStack's 530 (DefaultSnapshotStrategy refuses quiescevm) leaving the
// snapshot in Error, no file copied and the volume Ready.
func TestCreateSnapshotQuiescevm(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "quiesce", 1)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	for _, tc := range []struct {
		name     string
		quiesce  bool
		code     int
		text     string
		state    string
		hasFiles bool
	}{
		{"quiescevm false", false, 0, "", "BackedUp", true},
		{"quiescevm true", true, 530, cloudsim.QuiesceRefused(vol), "Error", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := cs.Snapshot.NewCreateSnapshotParams(vol)
			p.SetName(tc.name)
			p.SetQuiescevm(tc.quiesce)
			r, err := cs.Snapshot.CreateSnapshot(p)
			if code, text := runJob(t, cs, r.JobID, err); code != tc.code || text != tc.text {
				t.Fatalf("createSnapshot job = %d %q, want %d %q", code, text, tc.code, tc.text)
			}
			lp := cs.Snapshot.NewListSnapshotsParams()
			lp.SetVolumeid(vol)
			lp.SetName(tc.name)
			l, err := cs.Snapshot.ListSnapshots(lp)
			if err != nil || l.Count != 1 || l.Snapshots[0].State != tc.state {
				t.Fatalf("listSnapshots = %+v, %v; want one in %s", l, err, tc.state)
			}
			files, _ := filepath.Glob(filepath.Join(s.StateDir(), "disks", "snap-"+r.Id+".img"))
			if (len(files) > 0) != tc.hasFiles {
				t.Fatalf("snapshot files %v, want some %v", files, tc.hasFiles)
			}
			v, _, err := cs.Volume.GetVolumeByID(vol)
			if err != nil || v.State != "Ready" {
				t.Fatalf("volume after the job: %+v, %v", v, err)
			}
		})
	}
}
