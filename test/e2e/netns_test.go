package e2e_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// netns is a network namespace with a veth pair into it, made by the
// test: host is the address on this side, peer the one inside.
type netns struct {
	name, hostIf    string
	host, peer      string
	cleanupCommands [][]string
}

// newNetns makes the namespace and the veth pair on a 10.200.x.0/30 no
// interface uses, and removes them when the test ends, whatever happens.
func newNetns(t *testing.T) *netns {
	t.Helper()
	testenv.RequireRoot(t)
	for _, tool := range []string{"ip", "tcpdump"} {
		_, err := exec.LookPath(tool)
		testenv.Require(t, err == nil, "needs %s (make deps)", tool)
	}
	used, _ := exec.Command("ip", "-o", "addr").Output()
	var x int
	for {
		n, _ := rand.Int(rand.Reader, big.NewInt(250))
		x = int(n.Int64()) + 2
		if !bytes.Contains(used, []byte(fmt.Sprintf("10.200.%d.", x))) {
			break
		}
	}
	var suffix [3]byte
	_, _ = rand.Read(suffix[:])
	id := hex.EncodeToString(suffix[:])
	ns := &netns{name: "vdtls" + id, hostIf: "vdh" + id, host: fmt.Sprintf("10.200.%d.1", x), peer: fmt.Sprintf("10.200.%d.2", x)}
	t.Cleanup(func() {
		_ = exec.Command("ip", "netns", "del", ns.name).Run()
		_ = exec.Command("ip", "link", "del", ns.hostIf).Run()
	})
	for _, args := range [][]string{
		{"netns", "add", ns.name},
		{"link", "add", ns.hostIf, "type", "veth", "peer", "name", "vdn" + id},
		{"link", "set", "vdn" + id, "netns", ns.name},
		{"addr", "add", ns.host + "/30", "dev", ns.hostIf},
		{"link", "set", ns.hostIf, "up"},
		{"-n", ns.name, "addr", "add", ns.peer + "/30", "dev", "vdn" + id},
		{"-n", ns.name, "link", "set", "vdn" + id, "up"},
		{"-n", ns.name, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return ns
}

// start runs a command inside the namespace; it is killed when the test
// ends.
func (ns *netns) start(t *testing.T, out *testenv.Buffer, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.name, name}, args...)...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "GORACE=halt_on_error=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

// capture runs tcpdump on the host end of the veth until stop, which
// returns everything captured.
func (ns *netns) capture(t *testing.T) (stop func() []byte) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "veth.pcap")
	out := &testenv.Buffer{}
	cmd := exec.Command("tcpdump", "-i", ns.hostIf, "-U", "-s", "0", "-w", file)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(out.String(), "listening on") },
		"tcpdump listening:\n%s", out.String())
	return func() []byte {
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("capture: %v\n%s", err, out.String())
		}
		return data
	}
}

// TestOffLoopbackTLS runs volumed inside a network namespace, reached
// only through a veth pair, with certificates of a few seconds' life:
// plain HTTP and plain NATS are refused; a full round trip over HTTPS with
// its events over NATS TLS, and a device agent over TLS, leave neither
// the API token, nor a credential's JWT, nor an operation id on the
// wire; clients keep working across renewals; a cluster member with a
// certificate of another CA is refused; requested_by names the token and
// the client address.
func TestOffLoopbackTLS(t *testing.T) {
	ns := newNetns(t)
	dataDir := t.TempDir()
	simOut := &testenv.Buffer{}
	simAddr := "127.0.0.1:18080"
	ns.start(t, simOut, cloudsimBin, "--listen", simAddr, "--state-dir", t.TempDir(), "--local-devices", "off", "--job-duration", "50ms")

	const lifetime = 6 * time.Second
	apiAddr, natsAddr, routeAddr := ns.peer+":8443", ns.peer+":4222", ns.peer+":6222"
	memberRoute := fmt.Sprintf("%s:%d", ns.host, testenv.FreePort(t))
	startMember(t, dataDir, ns.host, memberRoute, routeAddr)
	conf := filepath.Join(dataDir, "nats.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("server_name: tls-1\nlisten: %s\njetstream { store_dir: %q }\n"+
		"cluster {\n  name: volumed\n  listen: %s\n  routes: [nats-route://%s, nats-route://%s]\n}\n",
		natsAddr, filepath.Join(dataDir, "nats"), routeAddr, routeAddr, memberRoute)), 0o600); err != nil {
		t.Fatal(err)
	}
	aliceToken := "alice-" + strings.Repeat("7", 30)
	tokensFile := filepath.Join(dataDir, "tokens")
	if err := os.WriteFile(tokensFile, []byte("alice:"+aliceToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	stop := ns.capture(t)
	out := &testenv.Buffer{}
	volumed := ns.start(t, out, volumedBin, "--listen", apiAddr, "--data-dir", dataDir, "--nats-config", conf,
		"--cloudstack-url", "http://"+simAddr+cloudsim.APIPath, "--cloudstack-api-key", cloudsim.DefaultAPIKey,
		"--cloudstack-secret-key", cloudsim.DefaultSecretKey, "--vm-id", cloudsim.ApplianceVMID,
		"--device-agent=false", "--nbd-listen=", "--api-tokens-file", tokensFile, "--tls-lifetime", lifetime.String(),
		"--log-level", "debug")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("volumed:\n%s\ncloudsim:\n%s", out.String(), simOut.String())
		}
	})
	caFile := filepath.Join(dataDir, pki.DirName, pki.CAFile)
	testenv.Eventually(t, 60*time.Second, func() bool { return strings.Contains(out.String(), "volumed ready") },
		"volumed ready")
	roots, err := client.LoadCA(caFile)
	if err != nil {
		t.Fatal(err)
	}
	base := "https://" + apiAddr
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	t.Run("plain HTTP refused", func(t *testing.T) {
		resp, err := http.Get("http://" + apiAddr + "/api/v1/operations")
		if err == nil {
			var body bytes.Buffer
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body.String(), "HTTPS") {
				t.Fatalf("plain HTTP: %d %s", resp.StatusCode, body.String())
			}
		}
	})
	t.Run("plain NATS refused", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", natsAddr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(conn)
		info, err := r.ReadString('\n')
		if err != nil || !strings.Contains(info, `"tls_required":true`) {
			t.Fatalf("INFO %q %v: want tls_required", info, err)
		}
		fmt.Fprintf(conn, "CONNECT {\"verbose\":false}\r\nPING\r\n")
		line, _ := r.ReadString('\n')
		if strings.HasPrefix(line, "PONG") {
			t.Fatal("a plain client got a PONG")
		}
	})

	api := func(token string) *client.Client {
		c, err := client.New(base, client.WithToken(token), client.WithRootCAs(roots))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	alice := api(aliceToken)
	natsOpts := func(role string) []nats.Option {
		return []nats.Option{nats.UserCredentials(bus.CredsFile(filepath.Join(dataDir, "creds"), role)), nats.RootCAs(caFile)}
	}
	events, err := nats.Connect("tls://"+natsAddr, natsOpts(bus.RoleOperator)...)
	if err != nil {
		t.Fatalf("operator over NATS TLS: %v", err)
	}
	defer events.Close()
	seen := make(chan *nats.Msg, 256)
	if _, err := events.ChanSubscribe(commands.SubjectOpsPrefix+">", seen); err != nil {
		t.Fatal(err)
	}
	if err := events.Flush(); err != nil {
		t.Fatal(err)
	}

	// A device agent of a VM of its own on this side of the veth (the
	// round trip attaches to a VM without one).
	const agentVM = "5c0ffee0-1111-4222-8333-944455556666"
	agentCreds := filepath.Join(t.TempDir(), "agent.creds")
	if b, err := exec.Command(volumedBin, "creds", "agent", "--vm-id", agentVM, "--data-dir", dataDir,
		"--out", agentCreds).CombinedOutput(); err != nil {
		t.Fatalf("creds agent: %v\n%s", err, b)
	}
	agentOut := &testenv.Buffer{}
	agent := exec.Command(volumedBin, "agent", "--vm-id", agentVM, "--nats-url", "tls://"+natsAddr,
		"--nats-creds", agentCreds, "--nats-ca", caFile, "--name-dir", filepath.Join(t.TempDir(), "names"))
	agent.Stdout, agent.Stderr = agentOut, agentOut
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Process.Signal(syscall.SIGTERM); _ = agent.Wait() })
	testenv.Eventually(t, 30*time.Second, func() bool { return strings.Contains(agentOut.String(), "device agent ready") },
		"the agent ready over TLS:\n%s", agentOut.String())
	daemonNC, err := nats.Connect("tls://"+natsAddr, natsOpts(bus.RoleDaemon)...)
	if err != nil {
		t.Fatal(err)
	}
	defer daemonNC.Close()
	if _, err := daemonNC.Request(commands.DevicesListSubject(agentVM), nil, 10*time.Second); err != nil {
		t.Fatalf("the agent's device list over TLS: %v", err)
	}

	// The round trip, each command waited for.
	var opIDs []string
	run := func(start func() (commands.Operation, error)) commands.Operation {
		t.Helper()
		op, err := start()
		if err != nil {
			t.Fatal(err)
		}
		opIDs = append(opIDs, op.ID)
		done, err := alice.Wait(ctx, op.ID)
		if err != nil || done.Status != commands.StatusCompleted {
			t.Fatalf("%s: %+v %v", op.Type, done, err)
		}
		return done
	}
	created := run(func() (commands.Operation, error) {
		return alice.CreateVolume(ctx, commands.CreateRequest{Name: "over-tls", Size: 1 << 30,
			DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	})
	vol := created.VolumeID
	run(func() (commands.Operation, error) { return alice.AttachVolume(ctx, vol, cloudsim.RemoteVMID) })
	run(func() (commands.Operation, error) { return alice.DetachVolume(ctx, vol) })
	run(func() (commands.Operation, error) { return alice.DeleteVolume(ctx, vol) })
	got := map[string]bool{}
	testenv.Eventually(t, 30*time.Second, func() bool {
		for {
			select {
			case m := <-seen:
				got[strings.TrimPrefix(m.Subject, commands.SubjectOpsPrefix)] = true
			default:
				for _, id := range opIDs {
					if !got[id] {
						return false
					}
				}
				return true
			}
		}
	}, "events of every operation over NATS TLS")

	t.Run("requested_by", func(t *testing.T) {
		// Over NATS, by the operator identity.
		body, _ := json.Marshal(commands.CreateRequest{Name: "over-nats-tls", Size: 1 << 30,
			DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
		reply, err := events.Request(commands.SubjectCreate, body, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var natsOp commands.Operation
		if err := json.Unmarshal(reply.Data, &natsOp); err != nil || natsOp.ID == "" {
			t.Fatalf("create over NATS: %s %v", reply.Data, err)
		}
		opIDs = append(opIDs, natsOp.ID)
		for id, want := range map[string]string{created.ID: "api-token:alice@" + ns.host, natsOp.ID: bus.CommandRequester} {
			op, err := alice.GetOperation(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			testenv.Require(t, op.RequestedBy != "", "acceptance recording requested_by (the engine's side)")
			if op.RequestedBy != want {
				t.Fatalf("requested_by %q, want %q", op.RequestedBy, want)
			}
		}
	})

	t.Run("renewal", func(t *testing.T) {
		// One HTTP/2 connection kept, and a new one for every call, over
		// three lifetimes: no call fails, several certificates are seen.
		// It goes on until three are seen (at most ten lifetimes): on a
		// loaded machine an iteration can take seconds, and sample two
		// renewals' certificates as one.
		serials := map[string]bool{}
		for start := time.Now(); time.Since(start) < 3*lifetime || len(serials) < 3 && time.Since(start) < 10*lifetime; {
			if _, err := alice.ListOperations(ctx, client.ListOptions{Limit: 1}); err != nil {
				t.Fatalf("kept connection across a renewal: %v", err)
			}
			conn, err := tls.Dial("tcp", apiAddr, &tls.Config{RootCAs: roots})
			if err != nil {
				t.Fatalf("new connection across a renewal: %v", err)
			}
			serials[conn.ConnectionState().PeerCertificates[0].SerialNumber.String()] = true
			conn.Close()
			if err := events.FlushTimeout(5 * time.Second); err != nil {
				t.Fatalf("NATS connection across a renewal: %v", err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		if len(serials) < 3 {
			t.Fatalf("%d server certificates in %v of a %v lifetime, want renewals", len(serials), 10*lifetime, lifetime)
		}
		if !events.IsConnected() || events.Stats().Reconnects != 0 {
			t.Fatalf("the NATS connection reconnected across renewals: %+v", events.Stats())
		}
	})

	t.Run("foreign cluster member", func(t *testing.T) {
		foreignCA, err := pki.LoadCA(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		k, err := pki.NewKeeper(pki.KeeperConfig{Issuer: foreignCA, Name: "intruder", Hosts: []string{ns.host}})
		if err != nil {
			t.Fatal(err)
		}
		if err := k.Start(ctx); err != nil {
			t.Fatal(err)
		}
		defer k.Close(ctx)
		mutual := pki.Trust{Certs: k, Roots: roots}.Mutual() // it knows our CA certificate, not its key
		route := &url.URL{Scheme: "nats-route", Host: routeAddr}
		srv, err := server.NewServer(&server.Options{ServerName: "intruder", Host: "127.0.0.1", Port: server.RANDOM_PORT,
			NoLog: true, NoSigs: true, Routes: []*url.URL{route},
			Cluster: server.ClusterOpts{Name: "volumed", Host: ns.host, Port: server.RANDOM_PORT, TLSConfig: mutual, TLSTimeout: 5}})
		if err != nil {
			t.Fatal(err)
		}
		srv.Start()
		defer srv.Shutdown()
		testenv.Eventually(t, 30*time.Second, func() bool {
			return strings.Contains(out.String(), "TLS route handshake error")
		}, "volumed refusing the intruder's route")
		if n := srv.NumRoutes(); n != 0 {
			t.Fatalf("the intruder has %d routes", n)
		}
	})

	_ = volumed.Process.Signal(syscall.SIGTERM)
	_ = volumed.Wait()
	capture := stop()
	if len(capture) < 20_000 {
		t.Fatalf("the capture holds %d bytes: nothing went over the veth?", len(capture))
	}
	secrets := map[string]string{"API token of alice": aliceToken, "Bearer": "Bearer "}
	if tok, err := os.ReadFile(filepath.Join(dataDir, "api-token")); err == nil {
		secrets["default API token"] = strings.TrimSpace(string(tok))
	}
	for _, f := range []string{bus.CredsFile(filepath.Join(dataDir, "creds"), bus.RoleOperator),
		bus.CredsFile(filepath.Join(dataDir, "creds"), bus.RoleDaemon), agentCreds} {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		token, err := jwt.ParseDecoratedJWT(data)
		if err != nil {
			t.Fatal(err)
		}
		secrets["JWT of "+filepath.Base(f)] = token
	}
	for _, id := range opIDs {
		secrets["operation id "+id] = strings.TrimPrefix(id, "op-")
	}
	for what, s := range secrets {
		if bytes.Contains(capture, []byte(s)) {
			t.Errorf("the capture holds the %s in clear text", what)
		}
	}
}

// startMember runs, in the test process on this side of the veth, the
// second member of volumed's cluster: a nats-server configured as the
// README says for an external server (`volumed creds server-config`,
// whose certificate of volumed's CA it presents on its routes, and
// requires of its peers).
func startMember(t *testing.T, dataDir, host, listen, peer string) {
	t.Helper()
	cfg, err := exec.Command(volumedBin, "creds", "server-config", "--data-dir", dataDir, "--tls-host", host).Output()
	if err != nil {
		t.Fatalf("creds server-config: %v", err)
	}
	if !bytes.Contains(cfg, []byte("tls {")) {
		t.Fatalf("server-config prints no TLS:\n%s", cfg)
	}
	conf := filepath.Join(t.TempDir(), "member.conf")
	body := fmt.Sprintf("%s\nserver_name: member-2\nlisten: 127.0.0.1:-1\njetstream { store_dir: %q }\n"+
		"cluster {\n  name: volumed\n  listen: %s\n  routes: [nats-route://%s]\n}\n", cfg, t.TempDir(), listen, peer)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("member config: %v\n%s", err, body)
	}
	dir := filepath.Join(dataDir, pki.DirName)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "nats-server-cert.pem"), filepath.Join(dir, "nats-server-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := client.LoadCA(filepath.Join(dir, pki.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	opts.Cluster.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair},
		RootCAs: roots, ClientCAs: roots, ClientAuth: tls.RequireAndVerifyClientCert}
	opts.Cluster.TLSTimeout, opts.NoLog, opts.NoSigs = 5, true, true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(15 * time.Second) {
		t.Fatal("member not ready")
	}
}

// TestPlainHTTPOffLoopbackRefusedAtStart: asking for plain HTTP off
// loopback is a configuration error (exit 2) that says why.
func TestPlainHTTPOffLoopbackRefusedAtStart(t *testing.T) {
	out, err := exec.Command(volumedBin, "--cloudstack-url", "http://127.0.0.1:1"+cloudsim.APIPath,
		"--cloudstack-api-key", cloudsim.DefaultAPIKey, "--cloudstack-secret-key", cloudsim.DefaultSecretKey,
		"--listen", "0.0.0.0:0", "--data-dir", t.TempDir(), "--api-tls", "off").CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), "plain HTTP is refused off loopback") {
		t.Fatalf("volumed --api-tls=off off loopback: %v\n%s", err, out)
	}
}

// TestTokensReloadedOnSIGHUP: a token added to --api-tokens-file works
// after SIGHUP and one removed is refused; the daemon goes on.
func TestTokensReloadedOnSIGHUP(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	tokens := filepath.Join(t.TempDir(), "tokens")
	alice, bob := "alice-"+strings.Repeat("a", 20), "bob-"+strings.Repeat("b", 20)
	if err := os.WriteFile(tokens, []byte("alice:"+alice+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, sim, daemonOpts{offLoopback: true, extra: []string{"--api-tokens-file", tokens}})
	status := func(token string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, d.api+"/operations", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := (&http.Client{Transport: d.transport()}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if a, b := status(alice), status(bob); a != 200 || b != 401 {
		t.Fatalf("before SIGHUP: alice %d, bob %d", a, b)
	}
	if err := os.WriteFile(tokens, []byte("bob:"+bob+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return status(bob) == 200 }, "bob's token after SIGHUP")
	if a := status(alice); a != 401 {
		t.Fatalf("a removed token after SIGHUP: %d, want 401", a)
	}
	if d := status(d.token); d != 200 {
		t.Fatalf("the default token after SIGHUP: %d", d)
	}
}

// TestNBDClientOfVolumedCA: off loopback the NBD server requires TLS and
// takes libnbd with the client files volumed keeps under its CA.
func TestNBDClientOfVolumedCA(t *testing.T) {
	_, err := exec.LookPath("nbdinfo")
	testenv.Require(t, err == nil, "needs nbdinfo (apt-get install libnbd-bin)")
	sim := startSim(t, cloudsim.Config{})
	port := testenv.FreePort(t)
	d := startDaemon(t, sim, daemonOpts{extra: []string{"--nbd-listen", fmt.Sprintf("0.0.0.0:%d", port)}})
	dir := filepath.Join(d.dataDir, pki.DirName, "nbd-client")
	if out, err := runClient(t, "nbdinfo", "--list", fmt.Sprintf("nbds://127.0.0.1:%d/?tls-certificates=%s", port, dir)); err != nil {
		t.Fatalf("nbdinfo over TLS with %s: %v\n%s", dir, err, out)
	}
	if out, err := runClient(t, "nbdinfo", "--list", fmt.Sprintf("nbd://127.0.0.1:%d", port)); err == nil {
		t.Fatalf("plain NBD off loopback listed the exports:\n%s", out)
	}
}

// TestVolctlOverHTTPS: volctl finds volumed's CA on its host
// ($VOLUMED_DATA_DIR) and drives the HTTPS API with it; another CA given
// with --cacert is refused.
func TestVolctlOverHTTPS(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{offLoopback: true})
	server := strings.TrimSuffix(d.api, "/api/v1")
	volctl := func(env []string, args ...string) (string, error) {
		cmd := exec.Command(volctlBin, append(args, "--server", server, "--token", d.token)...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := volctl([]string{"VOLUMED_DATA_DIR=" + d.dataDir}, "health"); err != nil {
		t.Fatalf("volctl health with volumed's CA found on its host: %v\n%s", err, out)
	}
	foreign, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "other-ca.pem")
	if err := os.WriteFile(other, foreign.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := volctl([]string{"VOLUMED_DATA_DIR=" + d.dataDir}, "health", "--cacert", other)
	if err == nil || !strings.Contains(out, "certificate") {
		t.Fatalf("volctl with another CA: %v\n%s", err, out)
	}
}
