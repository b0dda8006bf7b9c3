package e2e_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// volctlRun is one run of the volctl binary.
type volctlRun struct {
	stdout, stderr string
	code           int
}

// volctl runs the binary against the daemon (VOLCTL_SERVER) with extra
// environment variables, stdin empty and stdout/stderr pipes.
func (d *daemon) volctl(env []string, args ...string) volctlRun {
	d.t.Helper()
	cmd := exec.Command(volctlBin, args...)
	cmd.Env = append(append(os.Environ(), "VOLCTL_SERVER="+strings.TrimSuffix(d.api, "/api/v1"), "VOLCTL_TOKEN=", "VOLCTL_NATS="), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		d.t.Fatalf("run volctl %v: %v", args, err)
	}
	return volctlRun{stdout: out.String(), stderr: errb.String(), code: cmd.ProcessState.ExitCode()}
}

// mustVolctl runs volctl and requires exit code want.
func (d *daemon) mustVolctl(want int, args ...string) volctlRun {
	d.t.Helper()
	r := d.volctl(nil, args...)
	if r.code != want {
		d.t.Fatalf("volctl %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, want, r.stdout, r.stderr)
	}
	return r
}

// decodeOut decodes a run's JSON stdout.
func decodeOut(t *testing.T, r volctlRun, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("stdout is not the expected JSON: %v\n%s", err, r.stdout)
	}
}

// TestVolctl drives the volctl binary through a volume's life against the
// real daemon and simulator: output formats, --wait, failures and exit
// codes.
func TestVolctl(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})

	r := d.mustVolctl(0, "volume", "create", "--name", "ctl-vol", "--size", "2GiB", "--zone", cloudsim.ZoneID,
		"--disk-offering", cloudsim.CustomOfferingID, "--metadata", "purpose=test", "--metadata", "owner=ops", "--wait", "-o", "json")
	var created commands.Operation
	decodeOut(t, r, &created)
	vol := created.VolumeID
	if created.Status != commands.StatusCompleted || vol == "" || created.Type != commands.OpCreate {
		t.Fatalf("create --wait -o json: %+v", created)
	}
	if !strings.Contains(r.stderr, created.ID) || strings.Contains(r.stderr, "\r") {
		t.Fatalf("progress on a pipe should be plain lines naming the operation:\n%q", r.stderr)
	}
	var req commands.CreateRequest
	if err := json.Unmarshal(created.Request, &req); err != nil || req.Metadata["purpose"] != "test" ||
		req.Metadata["owner"] != "ops" || req.Size != 2<<30 {
		t.Fatalf("request not as given: %s %v", created.Request, err)
	}

	var st commands.VolumeStatus
	decodeOut(t, d.mustVolctl(0, "volume", "get", vol, "-o", "json"), &st)
	if st.VolumeID != vol || st.Size != 2<<30 {
		t.Fatalf("volume get: %+v", st)
	}
	if out := d.mustVolctl(0, "volume", "get", vol).stdout; !strings.Contains(out, vol) || !strings.Contains(out, "2GiB") ||
		!strings.Contains(out, "ctl-vol") || !strings.HasPrefix(out, "VOLUME") {
		t.Fatalf("volume get table:\n%s", out)
	}

	// Without --wait: the accepted operation, then op wait.
	var attach commands.Operation
	decodeOut(t, d.mustVolctl(0, "volume", "attach", vol, "--vm", cloudsim.RemoteVMID, "-o", "json"), &attach)
	if attach.Status != commands.StatusPending || attach.Type != commands.OpAttach {
		t.Fatalf("attach without --wait: %+v", attach)
	}
	var waited commands.Operation
	decodeOut(t, d.mustVolctl(0, "op", "wait", attach.ID, "-o", "json"), &waited)
	if waited.Status != commands.StatusCompleted || waited.Response == nil || waited.Response.DeviceID == nil {
		t.Fatalf("op wait: %+v", waited)
	}
	if out := d.mustVolctl(0, "op", "get", attach.ID).stdout; !strings.Contains(out, "completed") || !strings.Contains(out, attach.ID) {
		t.Fatalf("op get table:\n%s", out)
	}
	// op watch over NATS replays every event to the terminal one.
	w := d.mustVolctl(0, "op", "watch", attach.ID, "--nats", d.natsURL,
		"--nats-creds", d.credsFile(bus.RoleOperator))
	lines := strings.Split(strings.TrimSpace(w.stdout), "\n")
	if len(lines) < 2 || !strings.Contains(lines[0], "pending") || !strings.Contains(lines[len(lines)-1], "completed") {
		t.Fatalf("op watch lines:\n%s", w.stdout)
	}

	for _, args := range [][]string{{"volume", "list", "--vm", cloudsim.RemoteVMID, "-o", "json"}, {"volume", "list", "-o", "json"}} {
		var list []commands.VolumeStatus
		decodeOut(t, d.mustVolctl(0, args...), &list)
		if !containsVolume(list, vol) {
			t.Fatalf("volctl %v: %+v lacks %s", args, list, vol)
		}
	}
	var m commands.Mapping
	decodeOut(t, d.mustVolctl(0, "device", vol, "-o", "json"), &m)
	if m.VolumeID != vol || m.VMID != cloudsim.RemoteVMID {
		t.Fatalf("device: %+v", m)
	}
	var ops []commands.OperationSummary
	decodeOut(t, d.mustVolctl(0, "op", "list", "--volume", vol, "-o", "json"), &ops)
	if len(ops) != 2 || ops[0].ID != attach.ID || ops[1].ID != created.ID {
		t.Fatalf("op list: %+v", ops)
	}
	r = d.mustVolctl(0, "op", "list", "--volume", vol, "--limit", "1", "-o", "json")
	cursor, ok := strings.CutPrefix(strings.TrimSpace(r.stderr), "more: --cursor ")
	if !ok {
		t.Fatalf("op list --limit 1 does not name the next page: %q", r.stderr)
	}
	decodeOut(t, d.mustVolctl(0, "op", "list", "--volume", vol, "--limit", "1", "--cursor", cursor, "-o", "json"), &ops)
	if len(ops) != 1 || ops[0].ID != created.ID {
		t.Fatalf("op list, second page: %+v", ops)
	}

	// A failing operation: --wait prints it and exits 1 with its error.
	if err := sim.SetFaults(cloudsim.Faults{JobFailureRate: map[string]float64{"detachVolume": 1}}); err != nil {
		t.Fatal(err)
	}
	r = d.mustVolctl(1, "volume", "detach", vol, "--wait")
	if !strings.Contains(r.stdout, "failed") || !strings.Contains(r.stderr, "failed") || !strings.Contains(r.stderr, "details:") {
		t.Fatalf("failed detach --wait:\nstdout: %s\nstderr: %s", r.stdout, r.stderr)
	}
	if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	// --wait following the events over NATS: the same final operation.
	var detached commands.Operation
	r = d.mustVolctl(0, "volume", "detach", vol, "--wait", "--nats", d.natsURL,
		"--nats-creds", d.credsFile(bus.RoleOperator), "-o", "json")
	decodeOut(t, r, &detached)
	if detached.Status != commands.StatusCompleted || detached.Type != commands.OpDetach || !strings.Contains(r.stderr, "pending") {
		t.Fatalf("detach --wait --nats: %+v\nstderr: %s", detached, r.stderr)
	}
	d.mustVolctl(0, "volume", "delete", vol, "--wait")

	// Errors: API refusals exit 1 with the code; usage errors exit 2.
	if r := d.mustVolctl(1, "volume", "get", vol); !strings.Contains(r.stderr, "NOT_FOUND") {
		t.Fatalf("get of a deleted volume: %s", r.stderr)
	}
	if r := d.mustVolctl(1, "volume", "create", "--name", "small", "--size", "1MiB", "--zone", cloudsim.ZoneID,
		"--disk-offering", cloudsim.CustomOfferingID); !strings.Contains(r.stderr, "INVALID_REQUEST") || !strings.Contains(r.stderr, `"field":"size"`) {
		t.Fatalf("too small a volume: %s", r.stderr)
	}
	for _, args := range [][]string{{"volume", "attach", vol}, {"volume", "get"}, {"health", "-o", "yaml"},
		{"volume", "frobnicate"}, {"op", "list", "--limit", "x"}, {"volume", "create", "--name", "n"}} {
		d.mustVolctl(2, args...)
	}

	var h commands.Health
	decodeOut(t, d.mustVolctl(0, "health", "-o", "json"), &h)
	if h.Status != commands.Healthy {
		t.Fatalf("health: %+v", h)
	}
	var sr commands.SyncResult
	decodeOut(t, d.mustVolctl(0, "sync", "-o", "json"), &sr)
	if sr.Message == "" {
		t.Fatalf("sync: %+v", sr)
	}
	if out := d.mustVolctl(0, "export", "list").stdout; !strings.HasPrefix(out, "VOLUME") {
		t.Fatalf("export list table:\n%s", out)
	}
	if out := d.mustVolctl(0, "--version").stdout; !strings.HasPrefix(out, "volctl ") {
		t.Fatalf("--version: %q", out)
	}
}

// TestVolctlToken checks that the token from VOLCTL_TOKEN or --token goes
// out as a bearer token, through a recording proxy in front of the daemon.
func TestVolctlToken(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	target, err := url.Parse(d.api)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: target.Scheme, Host: target.Host})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	defer srv.Close()
	tests := []struct {
		env  []string
		args []string
		want string
	}{
		{[]string{"VOLCTL_SERVER=" + srv.URL, "VOLCTL_TOKEN=from-env"}, []string{"health"}, "Bearer from-env"},
		{[]string{"VOLCTL_TOKEN=from-env"}, []string{"health", "--server", srv.URL, "--token", "from-flag"}, "Bearer from-flag"},
		{[]string{"VOLCTL_SERVER=" + srv.URL}, []string{"health"}, ""},
	}
	for _, tc := range tests {
		mu.Lock()
		seen = nil
		mu.Unlock()
		if r := d.volctl(tc.env, tc.args...); r.code != 0 {
			t.Fatalf("volctl %v: exit %d: %s", tc.args, r.code, r.stderr)
		}
		mu.Lock()
		got := seen
		mu.Unlock()
		if len(got) != 1 || got[0] != tc.want {
			t.Fatalf("volctl %v with %v: Authorization %q, want %q", tc.args, tc.env, got, tc.want)
		}
	}
}

// TestVolctlTerminal runs volctl --wait in a pseudo-terminal: progress is
// one line redrawn in place, then the final operation.
func TestVolctlTerminal(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	// The create's job is held until volctl showed it executing: volctl
	// samples the operation about once a second, and on a loaded machine
	// a job of a fixed duration could run between two samples.
	if err := sim.SetFaults(cloudsim.Faults{JobHold: map[string]bool{"createVolume": true}}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(volctlBin, "volume", "create", "--name", "tty-vol", "--size", "1GiB", "--zone", cloudsim.ZoneID,
		"--disk-offering", cloudsim.CustomOfferingID, "--wait")
	cmd.Env = append(os.Environ(), "VOLCTL_SERVER="+strings.TrimSuffix(d.api, "/api/v1"), "VOLCTL_NATS=", "VOLCTL_TOKEN=")
	tty, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 24, Cols: 160})
	if err != nil {
		t.Fatalf("start volctl in a pty: %v", err)
	}
	defer tty.Close()
	var out testenv.Buffer
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(&out, tty) // ends with EIO once volctl exits
		copied <- err
	}()
	testenv.Eventually(t, 30*time.Second, func() bool { return strings.Contains(out.String(), "executing") },
		"volctl shows the create executing")
	if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	if err := <-copied; err != nil && !errors.Is(err, syscall.EIO) {
		t.Fatalf("read pty: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("volctl in a pty: %v\n%q", err, out.String())
	}
	s := out.String()
	live := strings.Count(s, "\r\x1b[K")
	if live < 2 || !strings.Contains(s, "executing") || !strings.Contains(s, "completed") || !strings.Contains(s, "tty-vol") && !strings.Contains(s, "create") {
		t.Fatalf("want a live line redrawn at least twice (executing, then completed), got %d redraws:\n%q", live, s)
	}
	if last := s[strings.LastIndex(s, "\r\x1b[K"):]; !strings.Contains(last, "completed") || !strings.Contains(last, "FIELD") {
		t.Fatalf("after the last redraw, want the completed line and the operation table:\n%q", last)
	}
}
