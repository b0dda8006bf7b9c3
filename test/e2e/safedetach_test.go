package e2e_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/correlate"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/testenv"
)

// refused submits a detach (or delete) of vol without force and requires
// it to fail with CONFLICT naming each of holders.
func (d *daemon) refused(method, path string, holders ...string) {
	d.t.Helper()
	op := d.wait(d.submit(method, path, nil).ID)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict {
		d.t.Fatalf("%s %s of a volume in use: %s %q %v, want FAILED CONFLICT", method, path, op.Status, op.Error, op.Details)
	}
	for _, h := range holders {
		if !strings.Contains(op.Error, h) {
			d.t.Fatalf("%s %s refused with %q, which does not name %q", method, path, op.Error, h)
		}
	}
	if _, ok := op.Details["users"]; !ok {
		d.t.Fatalf("refusal without details.users: %v", op.Details)
	}
}

// holdOpen starts a sleep holding path open (a shell redirect) and
// returns it; it is killed at the end of the test.
func holdOpen(t *testing.T, path string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", "exec 3<"+path+"; exec sleep 600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	// The shell opens path, then becomes sleep: until then the holder is
	// named sh.
	comm := fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid)
	testenv.Eventually(t, 10*time.Second, func() bool {
		b, err := os.ReadFile(comm)
		return err == nil && strings.TrimSpace(string(b)) == "sleep"
	}, "pid %d holding %s became sleep", cmd.Process.Pid, path)
	return cmd
}

// TestSafeDetach, on a real loop device of this host: a detach is refused
// while the volume is mounted, while a process has it open and while its
// NBD export has a client, each refusal naming the holder, and nothing is
// done (the client goes on reading). The same detach with force cuts the
// NBD client and detaches it in CloudStack, but completes only once the
// kernel removed the device: it waits at the release step, with the
// mapping kept, until the mount and the process let go.
func TestSafeDetach(t *testing.T) {
	requireNBDClients(t)
	_, err := exec.LookPath("mkfs.ext4")
	testenv.Require(t, err == nil, "needs mkfs.ext4 (apt-get install e2fsprogs)")
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("safe-detach", 1)
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	dev, loop := m.DevicePath, filepath.Base(m.DevicePath)
	detach := "/volumes/" + vol + "/detach"

	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %s: %v: %s", dev, err, out)
	}
	dir := t.TempDir()
	if err := unix.Mount(dev, dir, "ext4", 0, ""); err != nil {
		t.Fatalf("mount %s: %v", dev, err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			if err := unix.Unmount(dir, 0); err != nil {
				t.Errorf("unmount %s: %v", dir, err)
				_ = unix.Unmount(dir, unix.MNT_DETACH) // never leave it mounted
			}
			mounted = false
		}
	}
	t.Cleanup(unmount)
	d.refused(http.MethodPost, detach, dev+" mounted on "+dir)

	holder := holdOpen(t, dev)
	d.refused(http.MethodPost, detach, fmt.Sprintf("pid %d (sleep) has %s open", holder.Process.Pid, dev), "mounted on "+dir)

	d.exportVolume(vol, false)
	c := holdClient(t, d.nbdURI(m.PersistentDeviceName), false)
	testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(vol) == 1 }, "client connected:\n%s", c.out.String())
	d.refused(http.MethodPost, detach, fmt.Sprintf("NBD export %s has 1 connected client(s)", m.PersistentDeviceName))
	if out := c.read(t); !strings.Contains(out, "read 512/512 bytes") {
		t.Fatalf("the NBD client was cut by a refused detach: %s", out)
	}
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)

	// Forced: the client is cut, CloudStack detaches, and the operation
	// waits for the device, which the mount and the process keep.
	// The bus body takes force as REST's does: checked the same way.
	msg, err := d.nats().Request(commands.SubjectDetach, []byte(`{"volume_id":"`+vol+`","force":"yes"}`), 10*time.Second)
	var bad commands.Error
	if err != nil || msg.Header.Get(commands.StatusHeader) != "400" || json.Unmarshal(msg.Data, &bad) != nil || bad.Details["field"] != "force" {
		t.Fatalf("volumes.cmd.detach with force not a boolean: %v %s", err, msg.Data)
	}
	id := d.submit(http.MethodPost, detach, map[string]any{"force": true}).ID
	testenv.Eventually(t, 60*time.Second, func() bool {
		var op commands.Operation
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+id, nil, &op)
		if op.Status.Terminal() {
			t.Fatalf("forced detach ended while the device is held: %s %q", op.Status, op.Error)
		}
		return op.Step == engine.StepRelease
	}, "forced detach waiting at %s", engine.StepRelease)
	if _, attached := sim.LocalDevice(vol); attached {
		t.Fatalf("CloudStack still shows %s attached", vol)
	}
	if out := c.read(t); strings.Contains(out, "read 512/512 bytes") {
		t.Fatalf("the NBD client still reads after a forced detach: %s", out)
	}
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, nil) // kept while the device is there
	if _, err := os.Stat(filepath.Join("/sys/block", loop, "loop", "backing_file")); err != nil {
		t.Fatalf("%s gone while mounted and open: %v", dev, err)
	}
	// Past the device agent's own release timeout, after which a detach
	// used to complete on CloudStack's answer, it still waits.
	var op commands.Operation
	for until := time.Now().Add(correlate.DefaultReleaseTimeout + 5*time.Second); time.Now().Before(until); {
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+id, nil, &op)
		if op.Status.Terminal() {
			t.Fatalf("forced detach ended while the device is held: %s %q", op.Status, op.Error)
		}
		time.Sleep(time.Second)
	}

	unmount()
	_ = holder.Process.Kill()
	_ = holder.Wait()
	op = d.completed(id)
	if op.Response == nil || op.Response.Message != "Volume detached successfully" {
		t.Fatalf("forced detach: %+v", op.Response)
	}
	d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
	if _, err := os.Stat(filepath.Join("/sys/block", loop, "loop", "backing_file")); err == nil {
		t.Fatalf("%s still bound when the detach completed", dev)
	}
	removeLoop(t, loop)
}

// removeLoop deletes an unbound loop device the simulator could not
// remove while it was busy (LOOP_CTL_REMOVE); one already gone is fine.
func removeLoop(t *testing.T, name string) {
	t.Helper()
	var idx int
	if _, err := fmt.Sscanf(name, "loop%d", &idx); err != nil {
		t.Fatalf("%s is not a loop device", name)
	}
	f, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.LOOP_CTL_REMOVE, uintptr(idx))
	if errno != 0 && errno != unix.ENODEV && errno != unix.ENOENT {
		t.Errorf("LOOP_CTL_REMOVE %s: %v", name, errno)
	}
}
