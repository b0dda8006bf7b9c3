package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// natsCluster is a JetStream cluster of real nats-server instances running
// in the test process, joined by routes, trusting volumed's credentials as
// `volumed creds server-config` sets it up.
type natsCluster struct {
	t     testing.TB
	nodes []*server.Server
	urls  []string
	// creds holds the authority's keys and the role credentials.
	creds string
}

// startNATSCluster starts n servers forming one cluster, with the
// authorization of one volumed authority, and waits until JetStream answers.
func startNATSCluster(t testing.TB, n int) *natsCluster {
	t.Helper()
	c := &natsCluster{t: t, creds: t.TempDir()}
	auth, err := bus.LoadAuthority(c.creds)
	if err != nil {
		t.Fatal(err)
	}
	if err := auth.WriteRoleCreds(); err != nil {
		t.Fatal(err)
	}
	trust, err := auth.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	clusterPorts := make([]int, n)
	var routes []string
	for i := range clusterPorts {
		clusterPorts[i] = testenv.FreePort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", clusterPorts[i]))
	}
	for i := range n {
		conf := filepath.Join(t.TempDir(), "nats.conf")
		body := fmt.Sprintf("%s\nserver_name: n%d\nlisten: 127.0.0.1:%d\njetstream { store_dir: %q }\n"+
			"cluster { name: volumed-test, listen: \"127.0.0.1:%d\", routes: [%s] }\n",
			trust, i+1, testenv.FreePort(t), t.TempDir(), clusterPorts[i], strings.Join(routes, ", "))
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		opts, err := server.ProcessConfigFile(conf)
		if err != nil {
			t.Fatalf("nats server %d config: %v", i+1, err)
		}
		opts.NoSigs, opts.NoLog = true, true
		srv, err := server.NewServer(opts)
		if err != nil {
			t.Fatalf("nats server %d: %v", i+1, err)
		}
		srv.Start()
		t.Cleanup(srv.Shutdown)
		if !srv.ReadyForConnections(15 * time.Second) {
			t.Fatalf("nats server %d not ready", i+1)
		}
		c.nodes = append(c.nodes, srv)
		c.urls = append(c.urls, srv.ClientURL())
	}
	nc, err := nats.Connect(c.url(), nats.UserCredentials(bus.CredsFile(c.creds, bus.RoleDaemon)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	testenv.Eventually(t, 30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err == nil
	}, "JetStream cluster with a meta leader")
	return c
}

// url lists every server, as --nats-url takes them.
func (c *natsCluster) url() string { return strings.Join(c.urls, ",") }

// kill shuts one server down, as losing its machine would.
func (c *natsCluster) kill(i int) {
	c.nodes[i].Shutdown()
	c.nodes[i].WaitForShutdown()
}

// startInstances runs n volumed processes against the cluster, sharing its
// JetStream (streams and state bucket with three replicas). Their device
// agents are off: the tests attach to a VM without one.
func startInstances(t testing.TB, sim cloud, c *natsCluster, n int) []*daemon {
	t.Helper()
	var ds []*daemon
	for range n {
		ds = append(ds, startDaemon(t, sim, daemonOpts{natsURL: c.url(), natsCreds: c.creds, extra: []string{"--device-agent=false"}}))
	}
	return ds
}

// executedBy returns the instances whose log shows them executing op.
func executedBy(ds []*daemon, opID string) []int {
	re := regexp.MustCompile(`operation executing.*operation_id=` + regexp.QuoteMeta(opID))
	var out []int
	for i, d := range ds {
		if re.MatchString(d.out.String()) {
			out = append(out, i)
		}
	}
	return out
}

// TestCluster runs three volumed processes on a three-node JetStream
// cluster against one simulator, and checks, in turn: order and exactly
// once with commands spread over the instances; lost replies; kill -9 of
// the instance running an attach; the loss of a NATS node.
func TestCluster(t *testing.T) {
	sim := startSim(t, cloudsim.Config{Seed: 5})
	c := startNATSCluster(t, 3)
	ds := startInstances(t, sim, c, 3)
	attach := map[string]string{"vm_id": cloudsim.RemoteVMID}

	t.Run("interleaved attach and detach through different instances", func(t *testing.T) {
		const vols = 4
		var ids []string
		for i := range vols {
			ids = append(ids, ds[i%len(ds)].createVolume(fmt.Sprintf("interleaved-%d", i), 1))
		}
		// attach, detach, attach, detach on every volume, each command
		// accepted by another instance than the one before.
		type cmd struct {
			op     commands.Operation
			attach bool
		}
		lines := make([][]cmd, vols)
		for round := range 4 {
			for v, vol := range ids {
				d := ds[(round+v)%len(ds)]
				if round%2 == 0 {
					lines[v] = append(lines[v], cmd{d.submit(http.MethodPost, "/volumes/"+vol+"/attach", attach), true})
				} else {
					lines[v] = append(lines[v], cmd{d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil), false})
				}
			}
		}
		executors := map[int]bool{}
		for v, vol := range ids {
			var opIDs []string
			for _, c := range lines[v] {
				done := ds[0].completed(c.op.ID)
				want := "Volume detached successfully"
				if c.attach {
					want = "Volume attached successfully"
				}
				if done.Response == nil || done.Response.Message != want {
					t.Errorf("volume %s: %s %s answered %+v, want %q: it ran out of order", vol, c.op.Type, c.op.ID, done.Response, want)
				}
				opIDs = append(opIDs, c.op.ID)
				for _, i := range executedBy(ds, c.op.ID) {
					executors[i] = true
				}
			}
			requireRanInOrder(t, ds[0], opIDs)
			st := sim.Stats()
			if st.AttachesSucceeded[vol] != 2 || st.DetachesSucceeded[vol] != 2 {
				t.Errorf("volume %s: CloudStack did %d attaches and %d detaches, want 2 and 2", vol, st.AttachesSucceeded[vol], st.DetachesSucceeded[vol])
			}
			var vs commands.VolumeStatus
			ds[1].mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &vs)
			if vs.VMID != nil {
				t.Errorf("volume %s attached to %s, but the last command was a detach", vol, *vs.VMID)
			}
		}
		if len(executors) < 2 {
			t.Errorf("every operation ran on instance(s) %v: the work was not spread", executors)
		}
	})

	t.Run("lost replies", func(t *testing.T) {
		lost := cloudsim.ErrorFault{Rate: 0.5, Kind: cloudsim.ErrorKindDropAfter}
		sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{
			"createVolume": lost, "attachVolume": lost, "detachVolume": lost}})
		defer sim.SetFaults(cloudsim.Faults{})
		var ids []string
		for i := range 6 {
			ids = append(ids, ds[i%len(ds)].createVolume(fmt.Sprintf("lost-cluster-%d", i), 1))
		}
		for i, vol := range ids {
			ds[(i+1)%len(ds)].completed(ds[i%len(ds)].submit(http.MethodPost, "/volumes/"+vol+"/attach", attach).ID)
		}
		for i, vol := range ids {
			ds[i%len(ds)].completed(ds[(i+2)%len(ds)].submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
		}
		requireOnceEach(t, sim, "lost-cluster-", ids)
		lostAny := false
		for _, d := range ds {
			lostAny = lostAny || strings.Contains(d.out.String(), "maybe_done=true")
		}
		if !lostAny {
			t.Fatal("no answer was lost: the test proves nothing")
		}
	})

	t.Run("kill -9 of the instance running an attach", func(t *testing.T) {
		vol := ds[0].createVolume("cluster-crash", 1)
		// Held until its instance is dead: a job with a duration could
		// end, and the operation complete in attempt 1, before the kill.
		sim.SetFaults(cloudsim.Faults{JobHold: map[string]bool{"attachVolume": true}})
		defer sim.SetFaults(cloudsim.Faults{})
		op := ds[0].submit(http.MethodPost, "/volumes/"+vol+"/attach", attach)
		testenv.Eventually(t, 30*time.Second, func() bool {
			var cur commands.Operation
			ds[0].mustCall(http.StatusOK, http.MethodGet, "/operations/"+op.ID, nil, &cur)
			return cur.JobID != "" && cur.Status == commands.StatusExecuting
		}, "attach job started")
		runners := executedBy(ds, op.ID)
		if len(runners) != 1 {
			t.Fatalf("operation executing on instances %v, want exactly one", runners)
		}
		victim := runners[0]
		ds[victim].kill9()
		sim.SetFaults(cloudsim.Faults{})
		survivor := ds[(victim+1)%len(ds)]
		done := survivor.completed(op.ID)
		if done.Attempts < 2 || done.Response == nil || done.Response.VMID != cloudsim.RemoteVMID {
			t.Fatalf("attach after the crash of its instance: %+v", done)
		}
		if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
			t.Fatalf("attaches done in CloudStack: %d, want exactly 1", n)
		}
		ds = append(ds[:victim:victim], ds[victim+1:]...)
	})

	t.Run("a NATS node killed", func(t *testing.T) {
		// Work in flight when the node goes ends; new work is taken.
		vol := ds[0].createVolume("node-loss", 1)
		sim.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"attachVolume": cloudsim.Duration(time.Second)}})
		inFlight := ds[1].submit(http.MethodPost, "/volumes/"+vol+"/attach", attach)
		c.kill(0)
		sim.SetFaults(cloudsim.Faults{})
		ds[1].completed(inFlight.ID)
		if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
			t.Fatalf("attaches done for the attach in flight: %d, want 1", n)
		}
		for i, d := range ds {
			op := submitEventually(t, d, http.MethodPost, "/volumes", map[string]any{"name": fmt.Sprintf("after-node-loss-%d", i),
				"size": 1 << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
			vol := d.completed(op.ID).VolumeID
			d.completed(submitEventually(t, ds[(i+1)%len(ds)], http.MethodPost, "/volumes/"+vol+"/attach", attach).ID)
			d.completed(submitEventually(t, d, http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
		}
	})
}

// submitEventually submits a command, trying again while the instance
// answers 503 (the cluster electing new leaders after losing a node).
func submitEventually(t *testing.T, d *daemon, method, path string, body any) commands.Operation {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		status, data := d.call(method, path, body)
		if status == http.StatusCreated {
			var op commands.Operation
			if err := json.Unmarshal(data, &op); err != nil {
				t.Fatal(err)
			}
			return op
		}
		if status != http.StatusServiceUnavailable || time.Now().After(deadline) {
			t.Fatalf("%s %s: status %d: %s", method, path, status, data)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// requireRanInOrder checks in the operation events that each operation
// started executing only after the one accepted before it had ended.
func requireRanInOrder(t *testing.T, d *daemon, ids []string) {
	t.Helper()
	ended := map[string]bool{}
	for _, ev := range d.opEvents(ids) {
		if ev.Status == commands.StatusExecuting {
			for _, earlier := range ids[:indexOf(ids, ev.ID)] {
				if !ended[earlier] {
					t.Errorf("%s started executing before %s ended", ev.ID, earlier)
				}
			}
		}
		if ev.Status.Terminal() {
			ended[ev.ID] = true
		}
	}
}

// TestClusterHostWork: two instances on one NATS cluster, one serving the
// appliance VM (device agent, NBD server), the other another VM without
// either. Commands sent to the other instance (and run by whichever takes
// their job) export the appliance's volume on the appliance's NBD server,
// on its per-VM subject, and end the export there.
func TestClusterHostWork(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	c := startNATSCluster(t, 3)
	host := startDaemon(t, sim, daemonOpts{natsURL: c.url(), natsCreds: c.creds})
	other := startDaemon(t, sim, daemonOpts{natsURL: c.url(), natsCreds: c.creds,
		extra: []string{"--vm-id", cloudsim.RemoteVMID, "--device-agent=false", "--nbd-listen", ""}})
	vol := other.createVolume("host-work", 1)
	other.attachLocal(vol)
	host.requireMapped(sim, vol)

	other.exportVolume(vol, true)
	host.requireExports(vol)
	other.completed(other.submit(http.MethodDelete, "/exports/"+vol, nil).ID)
	host.requireExports()

	// Detach through the other instance ends the export on the host first.
	other.exportVolume(vol, false)
	host.requireExports(vol)
	other.completed(other.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	host.requireExports()
}
