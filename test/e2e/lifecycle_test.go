package e2e_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// pattern is 1 MiB of random data.
func pattern(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 1<<20)
	_, _ = rand.Read(b)
	return b
}

// writeNBD writes data at the start of the export of m's volume.
func (d *daemon) writeNBD(m commands.Mapping, data []byte) {
	d.t.Helper()
	src := filepath.Join(d.t.TempDir(), "pattern")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		d.t.Fatal(err)
	}
	if out, err := runClient(d.t, "nbdcopy", src, d.nbdURI(m.PersistentDeviceName)); err != nil {
		d.t.Fatalf("nbdcopy to %s: %v: %s", m.PersistentDeviceName, err, out)
	}
	// nbdcopy has disconnected; the server counts its connections until it
	// has read their ends, and a volume in use refuses a detach.
	testenv.Eventually(d.t, 20*time.Second, func() bool { return d.clientsOf(m.VolumeID) == 0 },
		"nbdcopy's connections to %s ended", m.PersistentDeviceName)
}

// readNBD reads n bytes from the start of the export of m's volume.
func (d *daemon) readNBD(m commands.Mapping, n int) []byte {
	d.t.Helper()
	back := filepath.Join(d.t.TempDir(), "back")
	if out, err := runClient(d.t, "qemu-img", "dd", "-f", "raw", "-O", "raw", "bs="+strconv.Itoa(n), "count=1",
		"if="+d.nbdURI(m.PersistentDeviceName), "of="+back); err != nil {
		d.t.Fatalf("qemu-img dd from %s: %v: %s", m.PersistentDeviceName, err, out)
	}
	b, err := os.ReadFile(back)
	if err != nil {
		d.t.Fatal(err)
	}
	return b
}

// attachExported attaches vol to the appliance, requires its mapping and
// exports it read-write.
func (d *daemon) attachExported(sim *cloudsim.Sim, vol string) commands.Mapping {
	d.t.Helper()
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	d.exportVolume(vol, false)
	return m
}

// failedWith requires an operation failed with code and, when given,
// CloudStack's text.
func (d *daemon) failedWith(opID, code, text string) commands.Operation {
	d.t.Helper()
	op := d.wait(opID)
	if op.Status != commands.StatusFailed || op.Details["code"] != code || !strings.Contains(op.Error, text) {
		d.t.Fatalf("operation %s: %s %q %v, want failed %s with %q", opID, op.Status, op.Error, op.Details, code, text)
	}
	return op
}

// TestSnapshotRevertData: pattern A written through NBD survives a
// snapshot, pattern B over it, a refused revert (attached to a running
// VM), a detach, the revert and a new attach; a volume made from the
// snapshot reads A too.
func TestSnapshotRevertData(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("snap-data", 1)
	m := d.attachExported(sim, vol)
	a, b := pattern(t), pattern(t)
	d.writeNBD(m, a)

	snapOp := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/snapshots", map[string]any{}).ID)
	snapID := snapOp.Response.SnapshotID
	if snapOp.Type != commands.OpSnapshot || snapID == "" {
		t.Fatalf("snapshot operation: %+v", snapOp.Response)
	}
	var snap commands.Snapshot
	d.mustCall(http.StatusOK, http.MethodGet, "/snapshots/"+snapID, nil, &snap)
	if snap.VolumeID != vol || snap.State != "BackedUp" || snap.Name != "volumed-"+strings.TrimPrefix(snapOp.ID, "op-") || snap.CreatedAt == nil {
		t.Fatalf("snapshot %+v", snap)
	}
	var list []commands.Snapshot
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/snapshots", nil, &list)
	if len(list) != 1 || list[0].ID != snapID {
		t.Fatalf("snapshots of %s: %+v", vol, list)
	}

	d.writeNBD(m, b)
	if got := d.readNBD(m, len(b)); !bytes.Equal(got, b) {
		t.Fatal("pattern B not written")
	}
	// CloudStack refuses to revert a volume attached to a running VM.
	d.failedWith(d.submit(http.MethodPost, "/volumes/"+vol+"/revert", map[string]string{"snapshot_id": snapID}).ID,
		commands.CodeCloudStackError, "not in the shutdown state")

	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	rev := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/revert", map[string]string{"snapshot_id": snapID}).ID)
	if rev.Response.SnapshotID != snapID {
		t.Fatalf("revert: %+v", rev.Response)
	}
	m = d.attachExported(sim, vol)
	if got := d.readNBD(m, len(a)); !bytes.Equal(got, a) {
		t.Fatal("after the revert the volume does not read pattern A")
	}

	create := d.completed(d.submit(http.MethodPost, "/volumes", map[string]any{"name": "from-snap", "snapshot_id": snapID}).ID)
	clone := create.VolumeID
	var st commands.VolumeStatus
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+clone, nil, &st)
	if st.Size != 1<<30 {
		t.Fatalf("volume from the snapshot: %+v", st)
	}
	mc := d.attachExported(sim, clone)
	if got := d.readNBD(mc, len(a)); !bytes.Equal(got, a) {
		t.Fatal("the volume made from the snapshot does not read pattern A")
	}

	d.completed(d.submit(http.MethodDelete, "/snapshots/"+snapID, nil).ID)
	d.mustCall(http.StatusNotFound, http.MethodGet, "/snapshots/"+snapID, nil, nil)
	d.mustCall(http.StatusNotFound, http.MethodDelete, "/snapshots/"+snapID, nil, nil)
}

// blockSize is a block device's size in bytes, from sysfs.
func blockSize(t *testing.T, devPath string) int64 {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(devPath), "size"))
	if err != nil {
		t.Fatal(err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(raw)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return sectors * 512
}

// TestResizeAttached: a resize of an attached, exported volume completes
// once its device shows the new size; the mapping, GET /volumes/{id} and
// the NBD export show it too. A shrink without shrink_ok is refused at once.
func TestResizeAttached(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("grow", 1)
	m := d.attachExported(sim, vol)
	a := pattern(t)
	d.writeNBD(m, a)

	const want = int64(2 << 30)
	op := d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/resize", map[string]any{"size": want}).ID)
	if op.Response.Size != want || !strings.Contains(op.Response.Message, "device shows") {
		t.Fatalf("resize response %+v, want the device's size followed", op.Response)
	}
	if got := blockSize(t, m.DevicePath); got != want {
		t.Fatalf("%s is %d bytes, want %d", m.DevicePath, got, want)
	}
	var mapped commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &mapped)
	if mapped.Size != want {
		t.Fatalf("mapping size %d, want %d", mapped.Size, want)
	}
	var st commands.VolumeStatus
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
	if st.Size != want || st.LinuxData == nil || st.LinuxData.Size != want || st.CloudStackData.Size != want {
		t.Fatalf("GET /volumes/%s: %+v %+v", vol, st, st.LinuxData)
	}
	out, err := runClient(t, "nbdinfo", "--size", d.nbdURI(m.PersistentDeviceName))
	if err != nil || strings.TrimSpace(out) != strconv.FormatInt(want, 10) {
		t.Fatalf("nbdinfo --size: %q %v, want %d", out, err, want)
	}
	if got := d.readNBD(m, len(a)); !bytes.Equal(got, a) {
		t.Fatal("the data before the resize is gone")
	}

	code, body := d.call(http.MethodPost, "/volumes/"+vol+"/resize", map[string]any{"size": int64(1 << 30)})
	if code != http.StatusUnprocessableEntity || !strings.Contains(string(body), "shrinkok") || !strings.Contains(string(body), commands.CodeCloudStackError) {
		t.Fatalf("shrink without shrink_ok: %d %s", code, body)
	}
}

// TestTagsAndVolumeList: create's metadata becomes the volume's tags, PUT
// replaces them exactly, GET /volumes finds volumes by tag; every refusal
// of the new routes is synchronous and names the field.
func TestTagsAndVolumeList(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	create := d.completed(d.submit(http.MethodPost, "/volumes", map[string]any{"name": "tagged", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID,
		"metadata": map[string]string{"env": "test", "owner": "team-a"}}).ID)
	vol := create.VolumeID
	other := d.createVolume("untagged", 1)
	tagsOf := func(id string) map[string]string {
		var st commands.VolumeStatus
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+id, nil, &st)
		return st.Tags
	}
	if got := tagsOf(vol); len(got) != 2 || got["env"] != "test" || got["owner"] != "team-a" {
		t.Fatalf("tags after create: %v", got)
	}
	if got := tagsOf(other); got == nil || len(got) != 0 {
		t.Fatalf("tags of an untagged volume: %v, want {}", got)
	}
	d.completed(d.submit(http.MethodPut, "/volumes/"+vol+"/tags", map[string]any{"tags": map[string]string{"env": "prod", "tier": "gold"}}).ID)
	if got := tagsOf(vol); len(got) != 2 || got["env"] != "prod" || got["tier"] != "gold" {
		t.Fatalf("tags after PUT: %v", got)
	}
	ids := func(query string) []string {
		var rows []commands.VolumeStatus
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes?"+query, nil, &rows)
		var out []string
		for _, r := range rows {
			out = append(out, r.VolumeID)
		}
		return out
	}
	if got := ids("tag=env=prod&tag=tier=gold"); len(got) != 1 || got[0] != vol {
		t.Fatalf("GET /volumes?tag=env=prod&tag=tier=gold: %v, want [%s]", got, vol)
	}
	var rows []commands.VolumeStatus
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes?tag=ENV=PROD", nil, &rows)
	if len(rows) != 1 || rows[0].CloudStackData == nil || rows[0].CloudStackData.Name != "tagged" || rows[0].Tags["tier"] != "gold" {
		t.Fatalf("GET /volumes?tag=ENV=PROD (CloudStack compares without case): %+v", rows)
	}
	if got := ids("tag=env=test"); len(got) != 0 {
		t.Fatalf("GET /volumes?tag=env=test: %v, want none", got)
	}
	if got := ids("name=untagged"); len(got) != 1 || got[0] != other {
		t.Fatalf("GET /volumes?name=untagged: %v", got)
	}
	all := ids("limit=1000")
	var paged []string
	for v, err := range d.cli().Volumes(context.Background(), client.VolumeListOptions{Limit: 1}) {
		if err != nil {
			t.Fatal(err)
		}
		paged = append(paged, v.VolumeID)
	}
	if len(all) < 2 || !slices.Equal(paged, all) {
		t.Fatalf("one page of all %v, pages of one %v", all, paged)
	}

	unknown := "00000000-0000-4000-8000-000000000000"
	for _, tc := range []struct {
		name, method, path string
		body               any
		status             int
		code, field        string
	}{
		{"create from an unknown snapshot", http.MethodPost, "/volumes", map[string]any{"name": "x", "snapshot_id": unknown},
			http.StatusUnprocessableEntity, commands.CodeCloudStackError, ""},
		{"get an unknown snapshot", http.MethodGet, "/snapshots/" + unknown, nil, http.StatusNotFound, commands.CodeNotFound, ""},
		{"delete an unknown snapshot", http.MethodDelete, "/snapshots/" + unknown, nil, http.StatusNotFound, commands.CodeNotFound, ""},
		{"revert to an unknown snapshot", http.MethodPost, "/volumes/" + vol + "/revert", map[string]string{"snapshot_id": unknown},
			http.StatusNotFound, commands.CodeNotFound, ""},
		{"snapshot of an unknown volume", http.MethodPost, "/volumes/" + unknown + "/snapshots", nil, http.StatusNotFound, commands.CodeNotFound, ""},
		{"resize without size", http.MethodPost, "/volumes/" + vol + "/resize", map[string]any{}, http.StatusBadRequest,
			commands.CodeInvalidRequest, "size"},
		{"resize below 1 GiB", http.MethodPost, "/volumes/" + vol + "/resize", map[string]any{"size": 10}, http.StatusBadRequest,
			commands.CodeInvalidRequest, "size"},
		{"tags not strings", http.MethodPut, "/volumes/" + vol + "/tags", map[string]any{"tags": map[string]int{"a": 1}},
			http.StatusBadRequest, commands.CodeInvalidRequest, "tags"},
		{"tags missing", http.MethodPut, "/volumes/" + vol + "/tags", map[string]any{}, http.StatusBadRequest,
			commands.CodeInvalidRequest, "tags"},
		{"revert without snapshot", http.MethodPost, "/volumes/" + vol + "/revert", map[string]any{}, http.StatusBadRequest,
			commands.CodeInvalidRequest, "snapshot_id"},
		{"list with a bad tag", http.MethodGet, "/volumes?tag=env", nil, http.StatusBadRequest, commands.CodeInvalidRequest, "tag"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e struct {
				Code    string         `json:"code"`
				Details map[string]any `json:"details"`
			}
			d.mustCall(tc.status, tc.method, tc.path, tc.body, &e)
			if e.Code != tc.code || (tc.field != "" && e.Details["field"] != tc.field) {
				t.Fatalf("%+v, want code %s field %q", e, tc.code, tc.field)
			}
		})
	}
	var ops []commands.OperationSummary
	d.mustCall(http.StatusOK, http.MethodGet, "/operations?type=tags", nil, &ops)
	if len(ops) != 1 {
		t.Fatalf("tags operations: %+v (refusals must record nothing)", ops)
	}
}
