package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestMakeRun runs scripts/run.sh, what `make run` runs after building, on
// a temporary data dir and free ports: the simulator and volumed start, a
// volume is created by REST until completed, and SIGINT to the script's
// process group (Ctrl-C) stops volumed and the simulator. A second run on
// the same data dir and ports starts again (no stale process holds a port)
// and still knows the volume.
func TestMakeRun(t *testing.T) {
	_, lookErr := exec.LookPath("bash")
	testenv.Require(t, lookErr == nil, "needs bash")
	dataDir := t.TempDir()
	natsConf := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(natsConf, fmt.Appendf(nil, "listen: 127.0.0.1:%d\njetstream {}\n", testenv.FreePort(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	api := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	env := append(os.Environ(), "VOLUMED_BIN="+volumedBin, "CLOUDSIM_BIN="+cloudsimBin,
		"VOLUMED_DATA_DIR="+dataDir, "CLOUDSIM_LISTEN="+fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)),
		"VOLUMED_LISTEN="+api, "VOLUMED_NATS_CONFIG="+natsConf,
		"VOLUMED_NBD_LISTEN="+fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)),
		"VOLUMED_NAME_DIR="+filepath.Join(dataDir, "by-volume"), "CLOUDSIM_LOCAL_DEVICES=off",
		"CLOUDSIM_JOB_DURATION=50ms", "GORACE=halt_on_error=1")
	c, err := client.New("http://" + api)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var volumeID string
	runScript(t, env, c, func() {
		op, err := c.CreateVolume(ctx, commands.CreateRequest{Name: "make-run", Size: 1 << 30,
			DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		if op, err = c.Wait(ctx, op.ID); err != nil || op.Status != commands.StatusCompleted {
			t.Fatalf("create ended %+v: %v", op, err)
		}
		volumeID = op.VolumeID
	})
	if _, err := os.Stat(filepath.Join(dataDir, "cloudsim", "state.json")); err != nil {
		t.Errorf("simulator state not in <data-dir>/cloudsim: %v", err)
	}
	runScript(t, env, c, func() {
		v, err := c.GetVolume(ctx, volumeID)
		if err != nil || v.VolumeID != volumeID || v.State != "Allocated" {
			t.Fatalf("volume %s after a restart: %+v %v", volumeID, v, err)
		}
	})
}

// runScript starts scripts/run.sh in a process group of its own, waits for
// volumed's API, runs use, then sends SIGINT to the group as a terminal's
// Ctrl-C does and checks that the script exits 0 and that the simulator and
// volumed it started are gone.
func runScript(t *testing.T, env []string, c *client.Client, use func()) {
	t.Helper()
	out := &testenv.Buffer{}
	cmd := exec.Command("bash", "../../scripts/run.sh")
	cmd.Env, cmd.Stdout, cmd.Stderr = env, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var children []int
	defer func() { // on failure, nothing is left running
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		for _, pid := range children {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}()
	testenv.Eventually(t, 60*time.Second, func() bool {
		select {
		case err := <-exited:
			t.Fatalf("run.sh exited at start: %v\n%s", err, out)
		default:
		}
		_, err := c.Health(context.Background())
		return err == nil
	}, "volumed answers after run.sh:\n%s", out)
	children = childrenOf(t, cmd.Process.Pid)
	var names []string
	for _, pid := range children {
		names = append(names, procName(pid))
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"cloudsim", "volumed"}) {
		t.Fatalf("run.sh runs %v, want cloudsim and volumed:\n%s", names, out)
	}
	use()
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("run.sh after SIGINT: %v\n%s", err, out)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("run.sh still running 60s after SIGINT:\n%s", out)
	}
	for _, pid := range children {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s (pid %d) outlived run.sh: %v\n%s", procName(pid), pid, err, out)
		}
	}
	for _, want := range []string{"volumed stopped", "cloudsim stopped"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("run.sh output lacks %q:\n%s", want, out)
		}
	}
}

// childrenOf lists the processes whose parent is pid, from /proc.
func childrenOf(t *testing.T, pid int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …; comm may hold spaces and parentheses.
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			kids = append(kids, child)
		}
	}
	return kids
}

// procName is a process's command name, "" once it is gone.
func procName(pid int) string {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(comm))
}
