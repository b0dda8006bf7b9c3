package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/apitest"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// volumedBin, cloudsimBin and volctlBin are the binaries the tests run,
// built once.
var volumedBin, cloudsimBin, volctlBin string

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
	volumedBin, cloudsimBin, volctlBin = filepath.Join(dir, "volumed"), filepath.Join(dir, "cloudsim"), filepath.Join(dir, "volctl")
	for bin, pkg := range map[string]string{volumedBin: "./cmd/volumed", cloudsimBin: "./test/cloudsim/cmd/cloudsim", volctlBin: "./cmd/volctl"} {
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
	// credsDir holds the NATS role credentials: the daemon's own, or those
	// of the external cluster it runs on.
	credsDir string
	// token is sent on every call when set (a daemon listening off loopback).
	token string
	// bin is the volumed binary run; "" is volumedBin (an older release's
	// in the upgrade tests).
	bin    string
	cmd    *exec.Cmd
	out    *testenv.Buffer
	exited chan struct{}
}

// daemonOpts configure startDaemon.
type daemonOpts struct {
	redisURL string
	dataDir  string
	// natsURL is an external NATS cluster (comma-separated URLs, three
	// replicas); "" runs the daemon's own embedded server.
	natsURL string
	// natsCreds is the directory of the external cluster's credentials
	// (daemon.creds, operator.creds, …); with natsURL.
	natsCreds string
	// natsConfig is the embedded server's nats.conf, written by the test
	// (a member of an embedded cluster), with natsConfigURL the client URL
	// it listens on; "" writes one on a free port.
	natsConfig, natsConfigURL string
	// extra are more flags.
	extra []string
	// offLoopback listens on every interface, so the API token is required.
	offLoopback bool
}

// cloud is a CloudStack API endpoint: the simulator in this process, or a
// cloudsim process.
type cloud interface{ URL() string }

// startDaemon runs the volumed binary against sim, with its own embedded
// NATS on a free port, and waits until its API answers.
func startDaemon(t testing.TB, sim cloud, o daemonOpts) *daemon {
	t.Helper()
	d := newDaemon(t, sim, o)
	d.start()
	t.Cleanup(d.stop)
	if o.offLoopback {
		d.token = d.apiToken()
	}
	return d
}

// newDaemon prepares a volumed process startDaemon would run, without
// starting it.
func newDaemon(t testing.TB, sim cloud, o daemonOpts) *daemon {
	t.Helper()
	if o.dataDir == "" {
		o.dataDir = t.TempDir()
	}
	natsArgs := []string{"--nats-url", o.natsURL, "--nats-replicas", "3",
		"--nats-creds", bus.CredsFile(o.natsCreds, bus.RoleDaemon), "--nats-service-creds", bus.CredsFile(o.natsCreds, bus.RoleService)}
	natsURL := o.natsURL
	switch {
	case o.natsConfig != "":
		natsArgs, natsURL = []string{"--nats-config", o.natsConfig, "--nats-replicas", "3"}, o.natsConfigURL
	case o.natsURL == "":
		natsPort := testenv.FreePort(t)
		conf := filepath.Join(o.dataDir, "nats.conf")
		if err := os.WriteFile(conf, []byte(fmt.Sprintf("listen: 127.0.0.1:%d\njetstream {}\n", natsPort)), 0o600); err != nil {
			t.Fatal(err)
		}
		natsArgs, natsURL = []string{"--nats-config", conf}, fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	}
	apiPort := testenv.FreePort(t)
	listen := fmt.Sprintf("127.0.0.1:%d", apiPort)
	if o.offLoopback {
		listen = fmt.Sprintf("0.0.0.0:%d", apiPort)
	}
	credsDir := filepath.Join(o.dataDir, "creds")
	if o.natsURL != "" {
		credsDir = o.natsCreds
	}
	scheme := "http"
	if o.offLoopback {
		scheme = "https" // volumed serves HTTPS off loopback
	}
	d := &daemon{t: t, dataDir: o.dataDir, api: fmt.Sprintf("%s://127.0.0.1:%d/api/v1", scheme, apiPort),
		natsURL: natsURL, credsDir: credsDir, nbdAddr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))}
	d.args = append([]string{"--listen", listen, "--data-dir", o.dataDir,
		"--cloudstack-url", sim.URL(), "--cloudstack-api-key", cloudsim.DefaultAPIKey,
		"--cloudstack-secret-key", cloudsim.DefaultSecretKey, "--vm-id", cloudsim.ApplianceVMID,
		"--ack-wait", "2s", "--log-level", "debug", "--name-dir", filepath.Join(o.dataDir, "by-volume"),
		"--nbd-listen", d.nbdAddr}, append(natsArgs, o.extra...)...)
	if o.redisURL != "" {
		d.args = append(d.args, "--redis-url", o.redisURL)
	}
	return d
}

// apiToken is the REST token volumed generated in its data dir.
func (d *daemon) apiToken() string {
	d.t.Helper()
	data, err := os.ReadFile(filepath.Join(d.dataDir, "api-token"))
	if err != nil {
		d.t.Fatalf("api token: %v", err)
	}
	return strings.TrimSpace(string(data))
}

// credsFile is the path of a role's NATS credentials volumed made.
func (d *daemon) credsFile(role string) string {
	return bus.CredsFile(d.credsDir, role)
}

// start runs the process and waits until its API answers.
func (d *daemon) start() {
	d.t.Helper()
	d.launch()
	d.awaitAPI()
}

// launch runs the process without waiting for it.
func (d *daemon) launch() {
	d.t.Helper()
	d.out = &testenv.Buffer{}
	bin := volumedBin
	if d.bin != "" {
		bin = d.bin
	}
	d.cmd = exec.Command(bin, d.args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.Env = append(os.Environ(), "GORACE=halt_on_error=1")
	if err := d.cmd.Start(); err != nil {
		d.t.Fatalf("start volumed: %v", err)
	}
	d.exited = make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(d.exited) }()
}

// awaitAPI waits until the launched process's API answers (volumed
// listens last, once everything else is up).
func (d *daemon) awaitAPI() {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := (&http.Client{Transport: d.transport()}).Get(d.api + "/health")
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
	d.awaitStop()
}

// awaitStop waits for a daemon sent SIGTERM to exit and requires a clean
// exit.
func (d *daemon) awaitStop() {
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

// nats connects a client to the daemon's embedded NATS server with the
// operator credentials, as the README's examples do.
func (d *daemon) nats() *nats.Conn {
	d.t.Helper()
	return d.natsAs(bus.RoleOperator)
}

// agentCreds mints the NATS credentials of vmID's device agent with
// `volumed creds agent` and returns their file.
func (d *daemon) agentCreds(vmID string) string {
	d.t.Helper()
	creds := filepath.Join(d.t.TempDir(), "agent-"+vmID+".creds")
	if out, err := exec.Command(volumedBin, "creds", "agent", "--vm-id", vmID, "--data-dir", d.dataDir,
		"--out", creds).CombinedOutput(); err != nil {
		d.t.Fatalf("volumed creds agent: %v\n%s", err, out)
	}
	return creds
}

// natsAgent connects as vmID's device agent.
func (d *daemon) natsAgent(vmID string) *nats.Conn {
	d.t.Helper()
	nc, err := nats.Connect(d.natsURL, nats.UserCredentials(d.agentCreds(vmID)),
		nats.CustomInboxPrefix(bus.AgentInboxPrefix(vmID)))
	if err != nil {
		d.t.Fatalf("connect NATS as the agent of %s: %v", vmID, err)
	}
	d.t.Cleanup(nc.Close)
	return nc
}

// natsAs connects a client with a role's credentials.
func (d *daemon) natsAs(role string, opts ...nats.Option) *nats.Conn {
	d.t.Helper()
	nc, err := nats.Connect(d.natsURL, append([]nats.Option{nats.UserCredentials(d.credsFile(role))}, opts...)...)
	if err != nil {
		d.t.Fatalf("connect NATS as %s: %v", role, err)
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
	if d.token != "" {
		req.Header.Set("Authorization", "Bearer "+d.token)
	}
	resp, data := validator.Do(d.t, &http.Client{Transport: d.transport()}, req)
	return resp.StatusCode, data
}

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

// transport reaches the daemon's API: over HTTPS it trusts volumed's CA
// in the data dir (until the daemon made it, calls fail and are retried).
func (d *daemon) transport() http.RoundTripper {
	if !strings.HasPrefix(d.api, "https:") {
		return http.DefaultTransport
	}
	roots, err := client.LoadCA(filepath.Join(d.dataDir, client.CAFile))
	if err != nil {
		return http.DefaultTransport
	}
	return &http.Transport{TLSClientConfig: client.TLSConfig(roots), DisableKeepAlives: true}
}

// cli is a Go client of the daemon whose every response is validated
// against the OpenAPI document.
func (d *daemon) cli() *client.Client {
	d.t.Helper()
	c, err := client.New(strings.TrimSuffix(d.api, "/api/v1"),
		client.WithHTTPClient(&http.Client{Transport: validating{t: d.t, rt: d.transport()}}), client.WithToken(d.token))
	if err != nil {
		d.t.Fatal(err)
	}
	return c
}

// validating is a RoundTripper that checks every response against the
// OpenAPI document.
type validating struct {
	t  testing.TB
	rt http.RoundTripper
}

func (v validating) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := v.rt.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	validator.Check(v.t, req, resp, body)
	resp.Body = io.NopCloser(bytes.NewReader(body))
	return resp, nil
}

// wait waits for an operation to end with the client's Wait (?wait) and
// returns it.
func (d *daemon) wait(opID string) commands.Operation {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	op, err := d.cli().Wait(ctx, opID)
	if err != nil {
		d.t.Fatalf("operation %s not terminal: %v (%+v)\n%s", opID, err, op, d.out.String())
	}
	return op
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

// createVolume creates a volume of size GiB through the client and
// returns its id.
func (d *daemon) createVolume(name string, gib int64) string {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	op, err := d.cli().CreateVolume(ctx, commands.CreateRequest{Name: name, Size: gib << 30,
		DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	if err != nil || op.Status != commands.StatusPending {
		d.t.Fatalf("create %s: %+v %v", name, op, err)
	}
	done := d.completed(op.ID)
	if done.VolumeID == "" || done.Response == nil || done.Response.VolumeID != done.VolumeID {
		d.t.Fatalf("create completed without a volume id: %+v", done)
	}
	return done.VolumeID
}

// simProcess is the cloudsim binary running as its own process, driven
// through its control endpoint.
type simProcess struct {
	t    *testing.T
	addr string
}

// startSimProcess runs the cloudsim binary on a free port with no local
// devices and 50 ms jobs; extra are more flags.
func startSimProcess(t *testing.T, extra ...string) *simProcess {
	t.Helper()
	p := &simProcess{t: t, addr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))}
	out := &testenv.Buffer{}
	cmd := exec.Command(cloudsimBin, append([]string{"--listen", p.addr, "--state-dir", t.TempDir(), "--local-devices", "off",
		"--job-duration", "50ms"}, extra...)...)
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
