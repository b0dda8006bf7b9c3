package e2e_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// nbdClientTimeout bounds one run of an NBD client.
const nbdClientTimeout = 60 * time.Second

// requireNBDClients requires root, loop devices and Debian's NBD clients.
func requireNBDClients(t *testing.T) {
	t.Helper()
	testenv.RequireLoopControl(t)
	for _, bin := range []string{"nbdinfo", "nbdcopy", "qemu-io"} {
		_, err := exec.LookPath(bin)
		testenv.Require(t, err == nil, "needs %s (apt-get install libnbd-bin qemu-utils)", bin)
	}
}

// nbdURI is the URI of an export of the daemon's NBD server.
func (d *daemon) nbdURI(name string) string { return "nbd://" + d.nbdAddr + "/" + name }

// runClient runs an NBD client to its end and returns its combined output.
func runClient(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nbdClientTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %v did not end within %v: %s", name, args, nbdClientTimeout, out)
	}
	return string(out), err
}

// exportVolume exports vol and returns the completed operation.
func (d *daemon) exportVolume(vol string, readOnly bool) commands.Operation {
	d.t.Helper()
	op := d.completed(d.submit(http.MethodPost, "/exports", map[string]any{"volume_id": vol, "read_only": readOnly}).ID)
	if want := devagent.PersistentName(vol); op.Type != commands.OpExport || op.Response == nil || op.Response.ExportName != want {
		d.t.Fatalf("export of %s: %+v, want export %s", vol, op.Response, want)
	}
	return op
}

// restExports lists the exports over REST.
func (d *daemon) restExports() []commands.Export {
	d.t.Helper()
	var list []commands.Export
	d.mustCall(http.StatusOK, http.MethodGet, "/exports", nil, &list)
	return list
}

// requireExports checks that the REST list and the NBD server's own list
// (nbdinfo --list) both hold exactly the exports of vols.
func (d *daemon) requireExports(vols ...string) {
	d.t.Helper()
	want := []string{}
	for _, v := range vols {
		want = append(want, devagent.PersistentName(v))
	}
	slices.Sort(want)
	rest := []string{}
	for _, e := range d.restExports() {
		rest = append(rest, e.ExportName)
	}
	slices.Sort(rest)
	if !slices.Equal(rest, want) {
		d.t.Fatalf("GET /exports names %v, want %v", rest, want)
	}
	out, err := runClient(d.t, "nbdinfo", "--list", "--json", "nbd://"+d.nbdAddr)
	if err != nil {
		d.t.Fatalf("nbdinfo --list: %v: %s", err, out)
	}
	var listing struct {
		Exports []struct {
			Name string `json:"export-name"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &listing); err != nil {
		d.t.Fatalf("nbdinfo --list --json output %q: %v", out, err)
	}
	served := []string{}
	for _, e := range listing.Exports {
		served = append(served, e.Name)
	}
	slices.Sort(served)
	if !slices.Equal(served, want) {
		d.t.Fatalf("nbdinfo --list names %v, want %v", served, want)
	}
}

// clientsOf is the connected clients GET /exports/{vol} reports.
func (d *daemon) clientsOf(vol string) int {
	d.t.Helper()
	var e commands.Export
	d.mustCall(http.StatusOK, http.MethodGet, "/exports/"+vol, nil, &e)
	return e.Clients
}

// heldClient is a qemu-io process connected to an export, taking commands
// on its standard input.
type heldClient struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *testenv.Buffer
	done chan struct{}
}

// holdClient connects qemu-io to an export and keeps it connected until
// its input is closed.
func holdClient(t *testing.T, uri string, readOnly bool) *heldClient {
	t.Helper()
	args := []string{"-f", "raw"}
	if readOnly {
		args = append(args, "-r")
	}
	c := &heldClient{cmd: exec.Command("qemu-io", append(args, uri)...), out: &testenv.Buffer{}, done: make(chan struct{})}
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	var err error
	if c.in, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	go func() { _ = c.cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		c.in.Close()
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.done
		}
	})
	return c
}

// read has the client read the first sector and returns what it printed.
func (c *heldClient) read(t *testing.T) string {
	t.Helper()
	before := len(c.out.String())
	if _, err := io.WriteString(c.in, "read -v 0 512\n"); err != nil {
		return "input closed: " + err.Error()
	}
	testenv.Eventually(t, 20*time.Second, func() bool {
		s := c.out.String()[before:]
		return strings.Contains(s, "ops/sec") || strings.Contains(strings.ToLower(s), "error") || c.exited()
	}, "qemu-io answer to a read; output so far:\n%s", c.out.String())
	return c.out.String()[before:]
}

func (c *heldClient) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// TestExportLifecycle follows the exports through export, I/O with real
// NBD clients, detach with a client connected, delete and a restart: the
// REST list and the NBD server's list always equal the exported volumes.
func TestExportLifecycle(t *testing.T) {
	forEachStore(t, func(t *testing.T, o daemonOpts) {
		requireNBDClients(t)
		sim := startLocalSim(t, false)
		d := startDaemon(t, sim, o)
		rw, ro := d.createVolume("export-rw", 1), d.createVolume("export-ro", 1)
		d.attachLocal(rw)
		d.attachLocal(ro)
		mrw, mro := d.requireMapped(sim, rw), d.requireMapped(sim, ro)
		d.requireExports()

		d.exportVolume(rw, false)
		d.exportVolume(ro, true)
		d.requireExports(rw, ro)
		var e commands.Export
		d.mustCall(http.StatusOK, http.MethodGet, "/exports/vol-"+ro, nil, &e)
		if e.ExportName != mro.PersistentDeviceName || e.DevicePath != mro.SymlinkPath || !e.ReadOnly ||
			e.Status != commands.ExportActive || e.VMID != cloudsim.ApplianceVMID || e.Clients != 0 {
			t.Fatalf("export of %s: %+v; mapping %+v", ro, e, mro)
		}

		t.Run("write through a read-write export", func(t *testing.T) {
			data := make([]byte, 1<<20)
			_, _ = rand.Read(data)
			src := filepath.Join(t.TempDir(), "data")
			if err := os.WriteFile(src, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := runClient(t, "nbdcopy", src, d.nbdURI(mrw.PersistentDeviceName)); err != nil {
				t.Fatalf("nbdcopy to %s: %v: %s", mrw.PersistentDeviceName, err, out)
			}
			got := make([]byte, len(data))
			f, err := os.Open(mrw.DevicePath)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := io.ReadFull(f, got); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("%s does not hold the data written through NBD (%v)", mrw.DevicePath, err)
			}
			back := filepath.Join(t.TempDir(), "back")
			if out, err := runClient(t, "qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M", "count=1",
				"if="+d.nbdURI(mrw.PersistentDeviceName), "of="+back); err != nil {
				t.Fatalf("qemu-img dd from %s: %v: %s", mrw.PersistentDeviceName, err, out)
			}
			if b, err := os.ReadFile(back); err != nil || !bytes.Equal(b, data) {
				t.Fatalf("read back %d bytes (%v), want the data written", len(b), err)
			}
		})

		t.Run("a read-only export refuses writes", func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "ones")
			if err := os.WriteFile(src, bytes.Repeat([]byte{1}, 4096), 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := runClient(t, "nbdcopy", src, d.nbdURI(mro.PersistentDeviceName)); err == nil {
				t.Fatalf("nbdcopy wrote to read-only export %s: %s", mro.PersistentDeviceName, out)
			}
			if out, err := runClient(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", d.nbdURI(mro.PersistentDeviceName)); err == nil &&
				!strings.Contains(strings.ToLower(out), "operation not permitted") && !strings.Contains(strings.ToLower(out), "read-only") {
				t.Fatalf("qemu-io write to read-only export: %s", out)
			}
			got := make([]byte, 4096)
			f, err := os.Open(mro.DevicePath)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := io.ReadFull(f, got); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
				t.Fatalf("%s changed through a read-only export (%v)", mro.DevicePath, err)
			}
		})

		t.Run("concurrent clients on two exports", func(t *testing.T) {
			a := holdClient(t, d.nbdURI(mrw.PersistentDeviceName), false)
			b := holdClient(t, d.nbdURI(mro.PersistentDeviceName), true)
			testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(rw) == 1 && d.clientsOf(ro) == 1 },
				"one client on each export; qemu-io said:\n%s\n%s", a.out.String(), b.out.String())
			var wg sync.WaitGroup
			outs := make([]string, 2)
			for i, c := range []*heldClient{a, b} {
				wg.Go(func() { outs[i] = c.read(t) })
			}
			wg.Wait()
			for i, out := range outs {
				if !strings.Contains(out, "read 512/512 bytes") {
					t.Fatalf("client %d read: %s", i, out)
				}
			}
			a.in.Close()
			b.in.Close()
			testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(rw) == 0 && d.clientsOf(ro) == 0 },
				"clients gone after qemu-io quit")
		})

		t.Run("detach while a client is connected", func(t *testing.T) {
			c := holdClient(t, d.nbdURI(mrw.PersistentDeviceName), false)
			testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(rw) == 1 }, "client connected:\n%s", c.out.String())
			loop := filepath.Base(mrw.DevicePath)
			// Refused without force (TestSafeDetach); force cuts the client.
			d.completed(d.submit(http.MethodPost, "/volumes/"+rw+"/detach", map[string]any{"force": true}).ID)
			d.requireExports(ro)
			d.mustCall(http.StatusNotFound, http.MethodGet, "/exports/"+rw, nil, nil)
			if out := c.read(t); strings.Contains(out, "read 512/512 bytes") {
				t.Fatalf("the client still reads after detach: %s", out)
			}
			testenv.Eventually(t, 20*time.Second, func() bool {
				_, err := os.Stat(filepath.Join("/sys/block", loop))
				return os.IsNotExist(err)
			}, "loop device %s gone after detach", loop)
			if out, err := runClient(t, "nbdinfo", "--size", d.nbdURI(mrw.PersistentDeviceName)); err == nil {
				t.Fatalf("the detached volume's export still answers: %s", out)
			}
		})

		d.completed(d.submit(http.MethodDelete, "/volumes/"+rw, nil).ID)
		d.requireExports(ro)

		d.stop()
		d.restart()
		d.requireExports(ro)
		if out, err := runClient(t, "nbdinfo", "--is", "read-only", d.nbdURI(mro.PersistentDeviceName)); err != nil {
			t.Fatalf("export %s after restart is not read-only: %v %s", mro.PersistentDeviceName, err, out)
		}

		d.completed(d.submit(http.MethodPost, "/volumes/"+ro+"/detach", nil).ID)
		d.requireExports()
		d.completed(d.submit(http.MethodDelete, "/volumes/"+ro, nil).ID)
		d.requireExports()
		var ops []commands.OperationSummary
		d.mustCall(http.StatusOK, http.MethodGet, "/operations?type=export", nil, &ops)
		if len(ops) != 2 {
			t.Fatalf("export operations recorded: %+v", ops)
		}
	})
}

// TestExportAuto: with --nbd-auto-export an attach to this host exports
// the volume read-only; its detach ends the export.
func TestExportAuto(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--nbd-auto-export"}})
	vol := d.createVolume("auto", 1)
	d.attachLocal(vol)
	d.requireExports(vol)
	var e commands.Export
	d.mustCall(http.StatusOK, http.MethodGet, "/exports/"+vol, nil, &e)
	if !e.ReadOnly {
		t.Fatalf("auto export is read-write: %+v", e)
	}
	// A volume on the remote VM is not this host's: no export.
	remote := d.createVolume("remote", 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+remote+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	d.requireExports(vol)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	d.requireExports()
}

// TestExportErrors: the documented errors for bad exports, and NBD's own
// error for a client asking for an export that does not exist.
func TestExportErrors(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	remote, idle := d.createVolume("remote", 1), d.createVolume("idle", 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+remote+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	unknown := "00000000-0000-4000-8000-000000000000"
	for _, tc := range []struct {
		name   string
		method string
		path   string
		body   any
		status int
		code   string
	}{
		{"export of a volume on another VM", http.MethodPost, "/exports", map[string]any{"volume_id": remote}, 409, commands.CodeConflict},
		{"export of a detached volume", http.MethodPost, "/exports", map[string]any{"volume_id": idle, "read_only": false}, 409, commands.CodeConflict},
		{"export of an unknown volume", http.MethodPost, "/exports", map[string]any{"volume_id": unknown}, 404, commands.CodeNotFound},
		{"export with a bad read_only", http.MethodPost, "/exports", `{"volume_id":"` + idle + `","read_only":1}`, 400, commands.CodeInvalidRequest},
		{"unexport of an unknown volume", http.MethodDelete, "/exports/" + unknown, nil, 404, commands.CodeNotFound},
		{"get of a volume not exported", http.MethodGet, "/exports/" + idle, nil, 404, commands.CodeNotFound},
		{"detach with a force not a boolean", http.MethodPost, "/volumes/" + idle + "/detach", `{"force":"yes"}`, 400, commands.CodeInvalidRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e commands.Error
			d.mustCall(tc.status, tc.method, tc.path, tc.body, &e)
			if e.Code != tc.code {
				t.Fatalf("error %+v, want %s", e, tc.code)
			}
		})
	}
	t.Run("unexport of a volume not exported completes", func(t *testing.T) {
		op := d.completed(d.submit(http.MethodDelete, "/exports/"+idle, nil).ID)
		if op.Type != commands.OpUnexport || op.Response.Message != "Volume was not exported" {
			t.Fatalf("unexport: %+v", op.Response)
		}
	})
	t.Run("nbd client asking for an unknown export", func(t *testing.T) {
		out, err := runClient(t, "nbdinfo", d.nbdURI(devagent.PersistentName(idle)))
		if err == nil || !strings.Contains(out, "server replied with error") {
			t.Fatalf("nbdinfo on an unknown export: %v: %s", err, out)
		}
	})
	t.Run("the bus command answers like REST", func(t *testing.T) {
		nc := d.nats()
		msg, err := nc.Request(commands.SubjectExport, []byte(`{"volume_id":"`+remote+`"}`), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var e commands.Error
		if msg.Header.Get(commands.StatusHeader) != "409" || json.Unmarshal(msg.Data, &e) != nil || e.Code != commands.CodeConflict {
			t.Fatalf("volumes.cmd.export of a remote volume: %s %s", msg.Header.Get(commands.StatusHeader), msg.Data)
		}
		msg, err = nc.Request(commands.SubjectUnexport, []byte(`{"volume_id":"`+idle+`"}`), 10*time.Second)
		if err != nil || msg.Header.Get(commands.StatusHeader) != "201" {
			t.Fatalf("volumes.cmd.unexport: %v %s", err, msg.Data)
		}
		var op commands.Operation
		if err := json.Unmarshal(msg.Data, &op); err != nil || op.Type != commands.OpUnexport {
			t.Fatalf("volumes.cmd.unexport reply %s", msg.Data)
		}
		d.completed(op.ID)
	})
	d.requireExports()
}

// TestForceSyncEndsDriftedExport detaches an exported volume behind
// volumed's back, with the cloudstack-go client: force-sync removes the
// mapping and ends the export, and says so.
func TestForceSyncEndsDriftedExport(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--sync-interval", "0"}})
	vol := d.createVolume("drifting-export", 1)
	d.attachLocal(vol)
	d.requireMapped(sim, vol)
	d.exportVolume(vol, true)
	d.requireExports(vol)

	cs := cloudstack.NewAsyncClient(sim.URL(), cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)
	p := cs.Volume.NewDetachVolumeParams()
	p.SetId(vol)
	if _, err := cs.Volume.DetachVolume(p); err != nil {
		t.Fatalf("detach behind volumed's back: %v", err)
	}
	var res commands.SyncResult
	d.mustCall(http.StatusOK, http.MethodPost, "/admin/force-sync", nil, &res)
	all := strings.Join(res.Changes, "\n")
	if !strings.Contains(all, "removed mapping of volume "+vol) || !strings.Contains(all, devagent.PersistentName(vol)) {
		t.Fatalf("force-sync changes %q: want the mapping and the export of %s gone", res.Changes, vol)
	}
	d.requireExports()
	d.mustCall(http.StatusNotFound, http.MethodGet, "/exports/"+vol, nil, nil)
}
