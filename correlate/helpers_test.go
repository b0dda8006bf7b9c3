package correlate_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"
	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/correlate"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

const (
	vm = cloudsim.ApplianceVMID
	gb = int64(1) << 30
)

// env is a real bus, embedded store, device agent with its NATS server,
// a correlator and a CloudStack simulator making real loop devices.
type env struct {
	sim      *cloudsim.Sim
	cs       *cloudstack.CloudStackClient
	store    state.Store
	corr     *correlate.Correlator
	agent    *devagent.Agent
	namesDir string
	nc       *nats.Conn
}

// setup starts everything for one test; cfg tunes the simulator and the
// correlator's timeouts.
func setup(t testing.TB, anonymous bool, timeout time.Duration) *env {
	t.Helper()
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	b := testenv.StartBus(t)
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatalf("store: %v", err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })

	agent := devagent.New(devagent.Config{VMID: vm, ScanInterval: 5 * time.Second, Logger: quiet})
	if err := agent.Start(ctx); err != nil {
		t.Fatalf("agent: %v", err)
	}
	t.Cleanup(func() { _ = agent.Close(context.Background()) })
	namesDir := filepath.Join(t.TempDir(), "by-volume")
	srv := devagent.NewServer(devagent.ServerConfig{VMID: vm, Conn: b.Conn(), JetStream: b.JetStream(),
		Agent: agent, Namer: devagent.NewNamer(namesDir), Logger: quiet})
	if err := srv.Start(ctx); err != nil {
		t.Fatalf("agent server: %v", err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })

	corr := correlate.New(correlate.Config{Conn: b.Conn(), Store: store, Timeout: timeout,
		ReleaseTimeout: 20 * time.Second, LocalVMID: vm, LocalStatus: agent.Status, Logger: quiet})
	if err := corr.Start(ctx); err != nil {
		t.Fatalf("correlator: %v", err)
	}
	t.Cleanup(func() { _ = corr.Close(context.Background()) })

	inv := cloudsim.DefaultInventory()
	inv.MaxDataDisks = 20
	sim := simtest.Start(t, cloudsim.Config{Inventory: inv, LocalDevices: cloudsim.LocalDevicesAuto,
		AnonymousBackingFiles: anonymous, JobDuration: 50 * time.Millisecond})
	testenv.Require(t, sim.LocalDevicesEnabled(), "cloudsim makes no loop devices here")
	return &env{sim: sim, store: store, corr: corr, agent: agent, namesDir: namesDir, nc: b.Conn(),
		cs: cloudstack.NewAsyncClient(sim.URL(), cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)}
}

// createVolume creates a volume of sizeGB GiB and returns its id.
func (e *env) createVolume(t testing.TB, sizeGB int64) string {
	t.Helper()
	p := e.cs.Volume.NewCreateVolumeParams()
	p.SetName("corr-" + uuid.NewString()[:8])
	p.SetDiskofferingid(cloudsim.CustomOfferingID)
	p.SetZoneid(cloudsim.ZoneID)
	p.SetSize(sizeGB)
	r, err := e.cs.Volume.CreateVolume(p)
	if err != nil {
		t.Errorf("createVolume: %v", err)
		return ""
	}
	return r.Id
}

// attach attaches a volume to the appliance VM in CloudStack, waiting for
// the job, and returns the mapping to correlate and the attach's start.
func (e *env) attach(volumeID string) (commands.Mapping, time.Time, error) {
	since := time.Now()
	r, err := e.cs.Volume.AttachVolume(e.cs.Volume.NewAttachVolumeParams(volumeID, vm))
	if err != nil {
		return commands.Mapping{}, since, err
	}
	return commands.Mapping{VolumeID: volumeID, VMID: vm, Size: r.Size, DeviceID: &r.Deviceid,
		CloudStackState: commands.CloudStackAttached}, since, nil
}

// correlate runs the correlator as the attach handler does and records
// the mapping it returns.
func (e *env) correlate(ctx context.Context, want commands.Mapping, since time.Time) (commands.Mapping, error) {
	if !e.corr.HasAgent(ctx, want.VMID) {
		return want, errors.New("no agent answers")
	}
	m, corrErr := e.corr.Attached(ctx, want, since)
	m.ID, m.CreatedAt = "mapping-"+want.VolumeID, time.Now().UTC()
	if old, err := e.store.GetMapping(ctx, m.VolumeID); err == nil {
		m.Revision = old.Revision
	}
	m, err := e.store.PutMapping(ctx, m)
	if err != nil {
		return m, fmt.Errorf("record mapping: %w", err)
	}
	return m, corrErr
}

// attachAndCorrelate creates and attaches a volume and correlates it.
func (e *env) attachAndCorrelate(t *testing.T, sizeGB int64) (string, commands.Mapping) {
	t.Helper()
	id := e.createVolume(t, sizeGB)
	want, since, err := e.attach(id)
	if err != nil {
		t.Fatalf("attach %s: %v", id, err)
	}
	m, err := e.correlate(context.Background(), want, since)
	if err != nil {
		t.Fatalf("correlate %s: %v", id, err)
	}
	return id, m
}

// simDevice is the loop device the simulator made for a volume.
func (e *env) simDevice(t testing.TB, volumeID string) cloudsim.LocalDevice {
	t.Helper()
	d, ok := e.sim.LocalDevice(volumeID)
	if !ok {
		t.Fatalf("simulator has no local device for %s", volumeID)
	}
	return d
}

// link reads the persistent-name symlink of a volume ("" if none).
func (e *env) link(volumeID string) string {
	target, err := os.Readlink(filepath.Join(e.namesDir, devagent.PersistentName(volumeID)))
	if err != nil {
		return ""
	}
	return target
}

// checkMapped asserts m maps the volume to the simulator's device with
// its persistent symlink.
func (e *env) checkMapped(t *testing.T, volumeID string, m commands.Mapping) {
	t.Helper()
	dev := e.simDevice(t, volumeID)
	name := devagent.PersistentName(volumeID)
	switch {
	case m.DevicePath != dev.Path:
		t.Errorf("volume %s mapped to %s, its device is %s", volumeID, m.DevicePath, dev.Path)
	case m.LinuxState != commands.LinuxDetected:
		t.Errorf("volume %s linux_state %s", volumeID, m.LinuxState)
	case m.PersistentDeviceName != name || m.SymlinkPath != filepath.Join(e.namesDir, name):
		t.Errorf("volume %s persistent name %q at %q", volumeID, m.PersistentDeviceName, m.SymlinkPath)
	case e.link(volumeID) != dev.Path:
		t.Errorf("symlink %s -> %q, want %s", name, e.link(volumeID), dev.Path)
	}
}

// detach detaches a volume in CloudStack, waiting for the job.
func (e *env) detach(t testing.TB, volumeID string) {
	t.Helper()
	p := e.cs.Volume.NewDetachVolumeParams()
	p.SetId(volumeID)
	if _, err := e.cs.Volume.DetachVolume(p); err != nil {
		t.Fatalf("detach %s: %v", volumeID, err)
	}
}
