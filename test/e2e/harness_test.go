package e2e_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/apitest"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/cloudsim/simtest"
)

// volumedBin and cloudsimBin are the binaries the tests run, built once.
var volumedBin, cloudsimBin string

// validator checks every REST response against the OpenAPI document.
var validator *apitest.Validator

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "volumed-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if validator, err = apitest.Load(); err != nil {
		fmt.Fprintln(os.Stderr, "OpenAPI document:", err)
		os.Exit(1)
	}
	volumedBin, cloudsimBin = filepath.Join(dir, "volumed"), filepath.Join(dir, "cloudsim")
	for bin, pkg := range map[string]string{volumedBin: "./cmd/volumed", cloudsimBin: "./cmd/cloudsim"} {
		args := []string{"build", "-o", bin}
		if raceBuild {
			args = append(args, "-race")
		}
		build := exec.Command("go", append(args, "github.com/volumed/volumed/"+strings.TrimPrefix(pkg, "./"))...)
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", pkg+":", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startSim runs the CloudStack simulator in the test process, with 50 ms
// jobs and no local devices unless cfg says otherwise.
func startSim(t testing.TB, cfg cloudsim.Config) *cloudsim.Sim {
	t.Helper()
	if cfg.JobDuration == 0 {
		cfg.JobDuration = 50 * time.Millisecond
	}
	return simtest.Start(t, cfg)
}

// daemon is one volumed process.
type daemon struct {
	t       testing.TB
	dataDir string
	args    []string
	api     string // http://host:port/api/v1
	natsURL string
	nbdAddr string // host:port of the NBD server
	cmd     *exec.Cmd
	out     *syncBuffer
	exited  chan struct{}
}

// daemonOpts configure startDaemon.
type daemonOpts struct {
	redisURL string
	dataDir  string
	// natsURL is an external NATS cluster (comma-separated URLs, three
	// replicas); "" runs the daemon's own embedded server.
	natsURL string
	extra   []string
}

// cloud is a CloudStack API endpoint: the simulator in this process, or a
// cloudsim process.
type cloud interface{ URL() string }

// startDaemon runs the volumed binary against sim, with its own embedded
// NATS on a free port, and waits until its API answers.
func startDaemon(t testing.TB, sim cloud, o daemonOpts) *daemon {
	t.Helper()
	if o.dataDir == "" {
		o.dataDir = t.TempDir()
	}
	natsArgs := []string{"--nats-url", o.natsURL, "--nats-replicas", "3"}
	natsURL := o.natsURL
	if o.natsURL == "" {
		natsPort := testenv.FreePort(t)
		conf := filepath.Join(o.dataDir, "nats.conf")
		if err := os.WriteFile(conf, []byte(fmt.Sprintf("listen: 127.0.0.1:%d\njetstream {}\n", natsPort)), 0o600); err != nil {
			t.Fatal(err)
		}
		natsArgs, natsURL = []string{"--nats-config", conf}, fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	d := &daemon{t: t, dataDir: o.dataDir, api: "http://" + listen + "/api/v1",
		natsURL: natsURL, nbdAddr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))}
	d.args = append([]string{"--listen", listen, "--data-dir", o.dataDir,
		"--cloudstack-url", sim.URL(), "--cloudstack-api-key", cloudsim.DefaultAPIKey,
		"--cloudstack-secret-key", cloudsim.DefaultSecretKey, "--vm-id", cloudsim.ApplianceVMID,
		"--ack-wait", "2s", "--log-level", "debug", "--name-dir", filepath.Join(o.dataDir, "by-volume"),
		"--nbd-listen", d.nbdAddr}, append(natsArgs, o.extra...)...)
	if o.redisURL != "" {
		d.args = append(d.args, "--redis-url", o.redisURL)
	}
	d.start()
	t.Cleanup(d.stop)
	return d
}

func (d *daemon) start() {
	d.t.Helper()
	d.out = &syncBuffer{}
	d.cmd = exec.Command(volumedBin, d.args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.Env = append(os.Environ(), "GORACE=halt_on_error=1")
	if err := d.cmd.Start(); err != nil {
		d.t.Fatalf("start volumed: %v", err)
	}
	d.exited = make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(d.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(d.api + "/health")
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-d.exited:
			d.t.Fatalf("volumed exited at start:\n%s", d.out.String())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("volumed did not answer within 30s:\n%s", d.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill9 kills the daemon as a crash would.
func (d *daemon) kill9() {
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
}

// restart starts the daemon again on the same data.
func (d *daemon) restart() { d.start() }

// stop shuts the daemon down with SIGTERM and requires a clean exit (a
// race report makes the exit code non-zero).
func (d *daemon) stop() {
	select {
	case <-d.exited:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(40 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
		d.t.Errorf("volumed did not stop within 40s of SIGTERM:\n%s", d.out.String())
		return
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		d.t.Errorf("volumed exited with %d after SIGTERM:\n%s", code, d.out.String())
	}
	if strings.Contains(d.out.String(), "WARNING: DATA RACE") {
		d.t.Errorf("data race in volumed:\n%s", d.out.String())
	}
}

// nats connects a client to the daemon's embedded NATS server.
func (d *daemon) nats() *nats.Conn {
	d.t.Helper()
	nc, err := nats.Connect(d.natsURL)
	if err != nil {
		d.t.Fatalf("connect NATS: %v", err)
	}
	d.t.Cleanup(nc.Close)
	return nc
}

// call does one REST request and returns the status and body; every
// response is validated against the OpenAPI document.
func (d *daemon) call(method, path string, body any) (int, []byte) {
	d.t.Helper()
	var rd io.Reader
	if body != nil {
		switch b := body.(type) {
		case string:
			rd = strings.NewReader(b)
		default:
			data, err := json.Marshal(b)
			if err != nil {
				d.t.Fatal(err)
			}
			rd = bytes.NewReader(data)
		}
	}
	req, err := http.NewRequest(method, d.api+path, rd)
	if err != nil {
		d.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, data := validator.Do(d.t, http.DefaultClient, req)
	return resp.StatusCode, data
}

// replicaLag bounds how long a replica of the embedded store may not show
// a record just written.
const replicaLag = 5 * time.Second

// mustCall is call requiring a status.
func (d *daemon) mustCall(want int, method, path string, body any, out any) {
	d.t.Helper()
	status, data := d.call(method, path, body)
	if status != want {
		d.t.Fatalf("%s %s: status %d, want %d: %s", method, path, status, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			d.t.Fatalf("%s %s: decode %s: %v", method, path, data, err)
		}
	}
}

// submit posts a command and returns the accepted operation.
func (d *daemon) submit(method, path string, body any) commands.Operation {
	d.t.Helper()
	var op commands.Operation
	d.mustCall(http.StatusCreated, method, path, body, &op)
	if op.Status != commands.StatusPending || !strings.HasPrefix(op.ID, "op-") {
		d.t.Fatalf("%s %s: accepted operation %+v", method, path, op)
	}
	return op
}

// wait waits for an operation to end, through ?wait (shorter than the
// client's own request timeout, so the server answers first), and returns
// it.
//
// An instance other than the one that accepted the operation may answer
// 404 for a moment: with three replicas, the embedded store's reads are
// JetStream direct gets, which a replica that has not caught up yet may
// answer. Such a 404 is asked again for a few seconds.
func (d *daemon) wait(opID string) commands.Operation {
	d.t.Helper()
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	for {
		var op commands.Operation
		status, data := d.call(http.MethodGet, "/operations/"+opID+"?wait=20s", nil)
		if status == http.StatusNotFound && time.Since(start) < replicaLag {
			time.Sleep(50 * time.Millisecond) // poll until the replica shows it
			continue
		}
		if status != http.StatusOK || json.Unmarshal(data, &op) != nil {
			d.t.Fatalf("GET /operations/%s: status %d: %s", opID, status, data)
		}
		if op.Status.Terminal() {
			return op
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("operation %s not terminal after 90s: %+v\n%s", opID, op, d.out.String())
		}
	}
}

// completed waits for an operation and requires it completed.
func (d *daemon) completed(opID string) commands.Operation {
	d.t.Helper()
	op := d.wait(opID)
	if op.Status != commands.StatusCompleted {
		d.t.Fatalf("operation %s %s: %s %v", opID, op.Status, op.Error, op.Details)
	}
	return op
}

// createVolume creates a volume of size GiB and returns its id.
func (d *daemon) createVolume(name string, gib int64) string {
	d.t.Helper()
	op := d.submit(http.MethodPost, "/volumes", map[string]any{"name": name, "size": gib << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	done := d.completed(op.ID)
	if done.VolumeID == "" || done.Response == nil || done.Response.VolumeID != done.VolumeID {
		d.t.Fatalf("create completed without a volume id: %+v", done)
	}
	return done.VolumeID
}

// syncBuffer is a bytes.Buffer safe for the process's writes and the
// test's reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// simProcess is the cloudsim binary running as its own process, driven
// through its control endpoint.
type simProcess struct {
	t    *testing.T
	addr string
}

// startSimProcess runs cmd/cloudsim on a free port with no local devices.
func startSimProcess(t *testing.T) *simProcess {
	t.Helper()
	p := &simProcess{t: t, addr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))}
	out := &syncBuffer{}
	cmd := exec.Command(cloudsimBin, "--listen", p.addr, "--state-dir", t.TempDir(), "--local-devices", "off",
		"--job-duration", "50ms")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start cloudsim: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	testenv.Eventually(t, 15*time.Second, func() bool {
		resp, err := http.Get("http://" + p.addr + cloudsim.ControlPath + "/stats")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, "cloudsim process answering:\n%s", out.String())
	return p
}

// URL is the CloudStack API URL of the process.
func (p *simProcess) URL() string { return "http://" + p.addr + cloudsim.APIPath }

// setFaults replaces the process's faults.
func (p *simProcess) setFaults(f cloudsim.Faults) {
	p.t.Helper()
	data, _ := json.Marshal(f)
	req, _ := http.NewRequest(http.MethodPut, "http://"+p.addr+cloudsim.ControlPath+"/faults", bytes.NewReader(data))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		p.t.Fatalf("set faults: %v %v", resp, err)
	}
	resp.Body.Close()
}

// stats reads the process's counters.
func (p *simProcess) stats() cloudsim.Stats {
	p.t.Helper()
	resp, err := http.Get("http://" + p.addr + cloudsim.ControlPath + "/stats")
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	var st cloudsim.Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		p.t.Fatal(err)
	}
	return st
}
