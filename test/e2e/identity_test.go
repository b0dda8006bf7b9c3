package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// attachMargin is how much longer than the simulator's jobs an attach of
// a reused device name may take: the correlation itself is milliseconds,
// but it was 30 s while a claim outlived its attach by a timer, which this
// margin still catches; under it, a loaded CI machine (every package at
// once with -race on 2 shared cores) can take seconds to set up a loop
// device, and a wave of six attaches more than 5 s.
const attachMargin = 20 * time.Second

// markerLen is the size of the marker written at offset 0 of each disk.
const markerLen = 16

// marker is what vol's disk holds at offset 0 once the test wrote it: its
// persistent name and "xmark", 16 bytes (alphanumeric, as qemu-io prints it).
func marker(vol string) []byte { return []byte(devagent.PersistentName(vol) + "xmark") }

// writeMarker writes vol's marker through its kernel device.
func writeMarker(t *testing.T, devicePath, vol string) {
	t.Helper()
	f, err := os.OpenFile(devicePath, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(marker(vol), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// forced is the detach body of the tests whose nameWatcher reads the
// disks at any moment: this process has them open now and then, which
// safe detach would otherwise refuse.
var forced = map[string]any{"force": true}

// nameWatcher reads through every persistent name, over and over, until
// stopped: a name whose disk holds another volume's marker is a failure.
type nameWatcher struct {
	dir   string
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	bad   []string
	reads int
}

func watchNames(dir string) *nameWatcher {
	w := &nameWatcher{dir: dir, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if !devagent.IsPersistentName(e.Name()) {
					continue
				}
				buf := make([]byte, markerLen)
				f, err := os.Open(filepath.Join(dir, e.Name()))
				if err != nil {
					continue // gone, or not yet a device
				}
				_, err = io.ReadFull(f, buf)
				f.Close()
				w.mu.Lock()
				w.reads++
				if err == nil && bytes.HasPrefix(buf, []byte("vol")) && bytes.HasSuffix(buf, []byte("xmark")) &&
					string(buf[:11]) != e.Name() {
					w.bad = append(w.bad, fmt.Sprintf("%s read %q", e.Name(), buf))
				}
				w.mu.Unlock()
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return w
}

// finish stops the watcher and fails the test for every bad read.
func (w *nameWatcher) finish(t *testing.T) {
	t.Helper()
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.bad) > 0 {
		t.Fatalf("a persistent name read another volume's disk: %q", w.bad)
	}
	if w.reads == 0 {
		t.Fatal("the watcher read through no name")
	}
	t.Logf("%d reads through persistent names, none of another volume's disk", w.reads)
}

// readExport reads the first bytes of an NBD export with qemu-io.
func (d *daemon) readExport(t *testing.T, name string) string {
	t.Helper()
	out, err := runClient(t, "qemu-io", "-f", "raw", "-r", "-c", fmt.Sprintf("read -v 0 %d", markerLen), d.nbdURI(name))
	if err != nil {
		t.Fatalf("qemu-io read of export %s: %v: %s", name, err, out)
	}
	return out
}

// TestReusedNameAttachCycles attaches and detaches volumes one after the
// other, so that the simulator's loop device names come back: each attach
// maps its own disk, completes within the job time plus attachMargin, its
// name and its NBD export read its own disk, and no name ever reads
// another volume's disk while the cycles run.
func TestReusedNameAttachCycles(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vols := createVolumes(d, 6)
	w := watchNames(d.nameDir())
	seen := map[string]int{}
	reused := 0
	for i, vol := range vols {
		op := d.attachLocal(vol)
		m := d.requireMapped(sim, vol)
		if m.DeviceIdentity == nil || m.DeviceIdentity.Path() != m.DevicePath || m.DeviceIdentity.DiskSeq == 0 {
			t.Fatalf("mapping of %s records identity %+v for %s", vol, m.DeviceIdentity, m.DevicePath)
		}
		if seen[m.DevicePath] > 0 {
			reused++
		}
		seen[m.DevicePath]++
		if took := op.Duration(); took > 50*time.Millisecond+attachMargin {
			t.Errorf("attach %d of %s to the reused name %s took %v", i, vol, m.DevicePath, took)
		} else {
			t.Logf("attach %d: %s in %v", i, m.DevicePath, took)
		}
		writeMarker(t, m.DevicePath, vol)
		got := make([]byte, markerLen)
		f, err := os.Open(m.SymlinkPath)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.ReadFull(f, got)
		f.Close()
		if err != nil || !bytes.Equal(got, marker(vol)) {
			t.Fatalf("%s reads %q (%v), want %q", m.SymlinkPath, got, err, marker(vol))
		}
		d.exportVolume(vol, true)
		if out := d.readExport(t, m.PersistentDeviceName); !strings.Contains(out, string(marker(vol))) {
			t.Fatalf("export %s of %s reads:\n%s\nwant %q", m.PersistentDeviceName, vol, out, marker(vol))
		}
		d.completed(d.submit(http.MethodDelete, "/exports/"+vol, nil).ID)
		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", forced).ID)
		if _, err := os.Lstat(m.SymlinkPath); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("name %s after detach: %v", m.SymlinkPath, err)
		}
	}
	w.finish(t)
	if reused == 0 {
		t.Fatalf("no loop device name came back in %d cycles: %v", len(vols), seen)
	}
	t.Logf("%d of %d attaches reused a name: %v", reused, len(vols), seen)
}

// TestSameSizeAttachesInWaves attaches 16 same-size volumes in waves of
// 6, detaching each wave before the next, so later waves reuse the names
// of earlier ones: every volume maps its own disk, and every attach ends
// within the job time plus attachMargin of its start.
func TestSameSizeAttachesInWaves(t *testing.T) {
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vols := createVolumes(d, 16)
	w := watchNames(d.nameDir())
	for start := 0; start < len(vols); start += 6 {
		wave := vols[start:min(start+6, len(vols))]
		began := time.Now()
		attachAll(d, wave)
		for _, vol := range wave {
			m := d.requireMapped(sim, vol)
			writeMarker(t, m.DevicePath, vol)
		}
		t.Logf("wave of %d attached in %v", len(wave), time.Since(began))
		if took := time.Since(began); took > time.Duration(len(wave))*(50*time.Millisecond)+attachMargin {
			t.Errorf("wave of %d took %v", len(wave), took)
		}
		for _, vol := range wave {
			d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", forced).ID)
		}
	}
	w.finish(t)
}

// TestForgedAgentReply answers the VM's list requests as a forged agent
// would, with a path that is a symlink to another device and one that is
// a regular file, each carrying the volume's identity: volumed records no
// such device and serves no export of it.
func TestForgedAgentReply(t *testing.T) {
	requireNBDClients(t)
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--device-agent=false", "--correlation-timeout", "3s"}})
	vol := d.createVolume("forged", 1)
	dir := t.TempDir()
	file := filepath.Join(dir, "vol-"+vol+".img")
	if err := os.WriteFile(file, []byte("SECRET OF A FILE"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "loop999")
	if err := os.Symlink("/dev/vda", link); err != nil {
		t.Fatal(err)
	}
	forged := []commands.Device{
		{Name: "loop999", Path: link, Major: 7, Minor: 999, Size: 1 << 30, BackingFile: file},
		{Name: "../../" + strings.TrimPrefix(file, "/"), Path: file, Major: 7, Minor: 998, Size: 1 << 30, BackingFile: file},
		{Name: "loop997", Path: "/dev/loop997", Major: 7, Minor: 997, Size: 1 << 30, BackingFile: file, DiskSeq: 1},
	}
	// The VM's own agent identity lies (a compromised agent): the most a
	// forger on the bus can be.
	nc := d.natsAgent(cloudsim.ApplianceVMID)
	sub, err := nc.Subscribe(commands.DevicesListSubject(cloudsim.ApplianceVMID), func(msg *nats.Msg) {
		data, _ := json.Marshal(forged)
		_ = msg.Respond(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	names, err := nc.Subscribe(commands.DevicesNamesSubject(cloudsim.ApplianceVMID), func(msg *nats.Msg) {
		var req devagent.NamesMessage
		_ = json.Unmarshal(msg.Data, &req)
		data, _ := json.Marshal(devagent.NamesMessage{Names: req.Names, Dir: dir})
		_ = msg.Respond(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer names.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	op := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID}).ID)
	var m commands.Mapping
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &m)
	if m.DevicePath != "" || m.LinuxState != commands.LinuxMissing || op.Status != commands.StatusFailed {
		t.Fatalf("forged device recorded: %+v (operation %+v)", m, op)
	}
	// None of them is a disk on this host: the attach ends in the timeout
	// and no export may serve anything.
	status, body := d.call(http.MethodPost, "/exports", map[string]any{"volume_id": vol, "read_only": true})
	if status == http.StatusCreated {
		var eop commands.Operation
		_ = json.Unmarshal(body, &eop)
		eop = d.wait(eop.ID)
		if eop.Status == commands.StatusCompleted {
			t.Fatalf("export of a forged device completed: %+v", eop)
		}
	}
	if out, err := runClient(t, "nbdinfo", "--list", "nbd://"+d.nbdAddr); strings.Contains(out, devagent.PersistentName(vol)) {
		t.Fatalf("NBD server lists an export of the forged device (%v):\n%s", err, out)
	}
}

// TestNoIdentityAcrossRestart attaches a volume whose disk carries no
// identity to a VM whose agent runs as its own process, and kills volumed
// after the disk appeared but before volumed saw the CloudStack job end.
// After the restart no new event announces the disk: the correlation,
// resumed, still finds it by its recorded arrival, by size and time.
func TestNoIdentityAcrossRestart(t *testing.T) {
	sim := startLocalSim(t, true)
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--device-agent=false", "--correlation-timeout", "10s"}})
	startAgentProcess(t, d)
	// Disks without identity are told apart by size and time only, and
	// other test processes make loop devices on this host: 7 GiB is a
	// size no other test uses.
	vol := d.createVolume("anonymous-restart", 7)
	if err := sim.SetFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{
		"queryAsyncJobResult": cloudsim.Duration(time.Minute)}}); err != nil {
		t.Fatal(err)
	}
	op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.ApplianceVMID})
	var local cloudsim.LocalDevice
	testenv.Eventually(t, 30*time.Second, func() bool {
		var ok bool
		local, ok = sim.LocalDevice(vol)
		return ok
	}, "simulator attached %s", vol)
	// The agent stores the disk's add; wait for it in the stream.
	js, err := jetstream.New(d.nats())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cons, err := js.OrderedConsumer(ctx, bus.StreamDevices, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{commands.DeviceSubject(cloudsim.ApplianceVMID, commands.DeviceAdd)}})
	if err != nil {
		t.Fatal(err)
	}
	for {
		msg, err := cons.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("no stored add of %s: %v", local.Path, err)
		}
		var dev commands.Device
		if json.Unmarshal(msg.Data(), &dev) == nil && dev.Path == local.Path && dev.BackingFile == local.BackingFile {
			break
		}
	}
	// And the operation has recorded its CloudStack job: killed before
	// that, it would start over (and look for devices from then on).
	testenv.Eventually(t, 30*time.Second, func() bool {
		var cur commands.Operation
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
		return cur.JobID != ""
	}, "operation %s recorded its job", op.ID)
	d.kill9()
	if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	d.restart()
	if got := d.wait(op.ID); got.Status != commands.StatusCompleted {
		t.Fatalf("resumed attach: %+v\n%s", got, d.out.String())
	}
	d.requireMapped(sim, vol)
}
