package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/test/cloudsim"
)

// startLocalSim runs the simulator with real loop devices for the
// appliance VM (the daemon's --vm-id) and room for many data disks.
func startLocalSim(t *testing.T, anonymous bool) *cloudsim.Sim {
	t.Helper()
	testenv.RequireLoopControl(t)
	inv := cloudsim.DefaultInventory()
	inv.MaxDataDisks = 20
	return startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesAuto, Inventory: inv,
		AnonymousBackingFiles: anonymous})
}

// attachLocal attaches vol to the appliance and returns the completed
// operation.
func (d *daemon) attachLocal(vol string) commands.Operation {
	d.t.Helper()
	return d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID}).ID)
}

// requireMapped checks that vol is mapped to the simulator's device for it,
// with its persistent name pointing there; a failure shows the daemon's
// log.
func (d *daemon) requireMapped(sim *cloudsim.Sim, vol string) commands.Mapping {
	d.t.Helper()
	local, ok := sim.LocalDevice(vol)
	if !ok {
		d.t.Fatalf("simulator has no local device for %s", vol)
	}
	var m commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &m)
	if m.DevicePath != local.Path || m.LinuxState != commands.LinuxDetected || m.CloudStackState != commands.CloudStackAttached {
		d.t.Fatalf("mapping of %s: %+v; the simulator attached it as %s; volumed's log:\n%s", vol, m, local.Path, d.out.String())
	}
	name := devagent.PersistentName(vol)
	if m.PersistentDeviceName != name || m.SymlinkPath != filepath.Join(d.nameDir(), name) {
		d.t.Fatalf("persistent name of %s: %q at %q; volumed's log:\n%s", vol, m.PersistentDeviceName, m.SymlinkPath, d.out.String())
	}
	if target, err := os.Readlink(m.SymlinkPath); err != nil || target != local.Path {
		d.t.Fatalf("%s -> %q (%v), want %s; volumed's log:\n%s", m.SymlinkPath, target, err, local.Path, d.out.String())
	}
	return m
}

func (d *daemon) nameDir() string { return filepath.Join(d.dataDir, "by-volume") }

func TestAttachMapsLocalDevice(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("local", 2)
	op := d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	if op.Response.DevicePath != m.DevicePath || m.Size != 2<<30 {
		t.Fatalf("attach response %+v, mapping %+v", op.Response, m)
	}
	var st commands.VolumeStatus
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
	if st.DevicePath == nil || *st.DevicePath != m.DevicePath || st.LinuxData == nil || st.LinuxData.Controller != "loop" {
		t.Fatalf("volume status %+v", st)
	}
	var byDev commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/devices/"+strings.ReplaceAll(strings.TrimPrefix(m.DevicePath, "/"), "/", "%2F")+"/volume", nil, &byDev)
	if byDev.VolumeID != vol {
		t.Fatalf("device %s maps to %+v", m.DevicePath, byDev)
	}
	var h commands.Health
	d.mustCall(http.StatusOK, http.MethodGet, "/health", nil, &h)
	if h.DeviceMonitor != commands.Healthy || h.Details.DeviceCount == 0 || h.Details.PollingInterval != "30s" {
		t.Fatalf("health %+v", h)
	}

	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
	if _, err := os.Lstat(m.SymlinkPath); !os.IsNotExist(err) {
		t.Fatalf("persistent name %s after detach: %v", m.SymlinkPath, err)
	}
	if _, err := os.Stat("/sys/block/" + filepath.Base(m.DevicePath) + "/loop/backing_file"); err == nil {
		t.Fatalf("%s still bound after detach", m.DevicePath)
	}
}

// TestConcurrentSameSizeAttaches attaches 16 volumes of one size at once:
// each must map the device whose backing file carries its own id.
func TestConcurrentSameSizeAttaches(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vols := createVolumes(d, 16)
	attachAll(d, vols)
	seen := map[string]string{}
	for _, vol := range vols {
		m := d.requireMapped(sim, vol)
		if other, dup := seen[m.DevicePath]; dup {
			t.Fatalf("%s given to %s and %s", m.DevicePath, other, vol)
		}
		seen[m.DevicePath] = vol
	}
}

// TestNoIdentityFallback attaches same-size volumes whose devices carry no
// identity (random backing file names): matched by size and time, one at a
// time per VM, each still gets its own device.
func TestNoIdentityFallback(t *testing.T) {
	sim := startLocalSim(t, true)
	d := startDaemon(t, sim, daemonOpts{})
	// 3 GiB: a size no other test package's loop devices have, since
	// devices without identity are told apart by size and time only.
	vols := make([]string, 4)
	for i := range vols {
		vols[i] = d.createVolume(fmt.Sprintf("anonymous-%d", i), 3)
	}
	attachAll(d, vols)
	for _, vol := range vols {
		d.requireMapped(sim, vol)
	}
}

func createVolumes(d *daemon, n int) []string {
	vols := make([]string, n)
	for i := range vols {
		vols[i] = d.createVolume(fmt.Sprintf("same-size-%02d", i), 1)
	}
	return vols
}

// attachAll submits every attach before waiting for any.
func attachAll(d *daemon, vols []string) {
	d.t.Helper()
	ops := make([]string, len(vols))
	var wg sync.WaitGroup
	for i, vol := range vols {
		wg.Go(func() {
			var op commands.Operation
			status, data := d.call(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID})
			if status != http.StatusCreated || json.Unmarshal(data, &op) != nil {
				d.t.Errorf("attach %s: %d %s", vol, status, data)
			}
			ops[i] = op.ID
		})
	}
	wg.Wait()
	if d.t.Failed() {
		d.t.FailNow()
	}
	for _, id := range ops {
		d.completed(id)
	}
}

// TestMappingsSurviveRestart restarts volumed: mappings and persistent
// names are intact, and a detach after the restart still cleans up.
func TestMappingsSurviveRestart(t *testing.T) {
	forEachStore(t, func(t *testing.T, o daemonOpts) {
		sim := startLocalSim(t, false)
		d := startDaemon(t, sim, o)
		vols := createVolumes(d, 2)
		for _, vol := range vols {
			d.attachLocal(vol)
		}
		d.stop()
		d.restart()
		for _, vol := range vols {
			d.requireMapped(sim, vol)
		}
		var res commands.SyncResult
		d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
		if len(res.Changes) != 0 {
			t.Fatalf("force-sync after a clean restart changed %q", res.Changes)
		}
		d.completed(d.submit(http.MethodPost, "/volumes/"+vols[0]+"/detach", nil).ID)
		if _, err := os.Lstat(filepath.Join(d.nameDir(), devagent.PersistentName(vols[0]))); !os.IsNotExist(err) {
			t.Fatalf("persistent name after detach: %v", err)
		}
		d.requireMapped(sim, vols[1])
	})
}

// TestSeparateAgentProcess turns volumed's own agent off and runs
// `volumed agent` as another process: attaches are correlated the same,
// and it tells who uses a disk before a detach.
func TestSeparateAgentProcess(t *testing.T) {
	sim := startLocalSim(t, false)
	dataDir := t.TempDir()
	d := startDaemon(t, sim, daemonOpts{dataDir: dataDir, extra: []string{"--device-agent=false"}})
	vol := d.createVolume("remote-agent", 1)

	startAgentProcess(t, d)
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	// The separate agent answers who uses the disk with its own
	// credentials: a process holding it refuses the detach; volumed's NBD
	// server serving it (another process of the same executable) does not.
	holder := holdOpen(t, m.DevicePath)
	d.refused(http.MethodPost, "/volumes/"+vol+"/detach", fmt.Sprintf("pid %d (sleep) has %s open", holder.Process.Pid, m.DevicePath))
	_ = holder.Process.Kill()
	_ = holder.Wait()
	d.exportVolume(vol, true)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
}

// startAgentProcess runs `volumed agent` for the appliance VM against d's
// bus, stopped with SIGINT when the test ends, and waits until it is ready.
func startAgentProcess(t *testing.T, d *daemon) {
	t.Helper()
	creds := d.agentCreds(cloudsim.ApplianceVMID)
	out := &testenv.Buffer{}
	agent := exec.Command(volumedBin, "agent", "--vm-id", cloudsim.ApplianceVMID, "--nats-url", d.natsURL,
		"--nats-creds", creds, "--name-dir", d.nameDir(), "--log-level", "debug")
	agent.Stdout, agent.Stderr = out, out
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- agent.Wait() }()
	t.Cleanup(func() {
		_ = agent.Process.Signal(os.Interrupt)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("volumed agent exited with %v after SIGINT:\n%s", err, out.String())
			}
		case <-time.After(20 * time.Second):
			_ = agent.Process.Kill()
			t.Errorf("volumed agent did not stop:\n%s", out.String())
		}
	})
	testenv.Eventually(t, 15*time.Second, func() bool { return strings.Contains(out.String(), "device agent ready") },
		"volumed agent ready:\n%s", out.String())
}

// TestDeviceRemovedBehindOurBack removes the loop device of an attached
// volume directly: the mapping stops pointing at it.
func TestDeviceRemovedBehindOurBack(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("vanishing", 1)
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	local, _ := sim.LocalDevice(vol)
	idx, err := strconv.Atoi(strings.TrimPrefix(local.Path, "/dev/loop"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := (&loopdev.Device{Index: idx, Path: local.Path, Backing: local.BackingFile}).Remove(ctx); err != nil {
		t.Fatalf("remove %s: %v", local.Path, err)
	}
	testenv.Eventually(t, 15*time.Second, func() bool {
		var cur commands.Mapping
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &cur)
		return cur.LinuxState == commands.LinuxMissing && cur.DevicePath == ""
	}, "mapping of the removed %s marked missing", m.DevicePath)
	if _, err := os.Lstat(m.SymlinkPath); !os.IsNotExist(err) {
		t.Fatalf("persistent name of a removed device: %v", err)
	}
}

// TestForceSyncRepairsBrokenMapping breaks a mapping by hand in Redis, its
// path or its recorded disk identity (an older diskseq: another disk that
// once had the name), and requires force-sync to point it back at the
// volume's disk as it is now.
func TestForceSyncRepairsBrokenMapping(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(m *commands.Mapping)
	}{
		{"path", func(m *commands.Mapping) { m.DevicePath = "/dev/loop99999" }},
		{"identity", func(m *commands.Mapping) { m.DeviceIdentity.DiskSeq-- }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sim := startLocalSim(t, false)
			r := testenv.StartRedis(t)
			d := startDaemon(t, sim, daemonOpts{redisURL: r.URL()})
			vol := d.createVolume("broken", 1)
			d.attachLocal(vol)
			m := d.requireMapped(sim, vol)

			// Another writer (an operator, a bug) breaks the mapping in the store.
			ctx := context.Background()
			store, err := redisstore.New(ctx, redisstore.Config{URL: r.URL()})
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close(ctx)
			broken, err := store.GetMapping(ctx, vol)
			if err != nil {
				t.Fatal(err)
			}
			id := *broken.DeviceIdentity
			broken.DeviceIdentity = &id
			tc.spoil(&broken)
			if _, err := store.PutMapping(ctx, broken); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(m.SymlinkPath); err != nil {
				t.Fatal(err)
			}
			var res commands.SyncResult
			d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
			if !strings.Contains(strings.Join(res.Changes, "\n"), "mapping of volume "+vol) {
				t.Fatalf("force-sync changes %q", res.Changes)
			}
			got := d.requireMapped(sim, vol)
			if got.DeviceIdentity == nil || *got.DeviceIdentity != *m.DeviceIdentity {
				t.Fatalf("repaired identity %+v, want %+v", got.DeviceIdentity, m.DeviceIdentity)
			}
		})
	}
}

// TestCorrelationTimeout attaches to the appliance while the simulator
// makes no local devices: the operation fails after the correlation
// timeout and the mapping says linux_state missing.
func TestCorrelationTimeout(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--correlation-timeout", "2s"}})
	vol := d.createVolume("no-device", 1)
	op := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID}).ID)
	if op.Status != commands.StatusFailed || !strings.Contains(op.Error, vol) {
		t.Fatalf("attach without a device: %+v", op)
	}
	var m commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &m)
	if m.CloudStackState != commands.CloudStackAttached || m.LinuxState != commands.LinuxMissing || m.DevicePath != "" {
		t.Fatalf("mapping after the timeout: %+v", m)
	}
}

// TestExportEndsWhenDeviceGoes announces on volumes.mappings.<id>, as the
// correlator does when a device vanishes (a loop device cannot be removed
// while an export holds it open, so the announcement is made by hand), that
// an exported volume's device is missing: the export ends at once.
func TestExportEndsWhenDeviceGoes(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("exported", 1)
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	d.completed(d.submit(http.MethodPost, "/exports", map[string]any{"volume_id": vol, "read_only": true}).ID)
	d.mustCall(http.StatusOK, http.MethodGet, "/exports/"+vol, nil, nil)

	m.LinuxState, m.DevicePath = commands.LinuxMissing, ""
	data, _ := json.Marshal(m)
	if err := d.natsAs(bus.RoleDaemon).Publish(commands.MappingSubject(vol), data); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 15*time.Second, func() bool {
		status, _ := d.call(http.MethodGet, "/exports/"+vol, nil)
		return status == http.StatusNotFound
	}, "export of %s ended", vol)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
}
