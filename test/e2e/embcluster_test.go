package e2e_test

import (
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
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// embeddedMember is the server_name of member i (from 0) of an embedded
// cluster.
func embeddedMember(i int) string { return fmt.Sprintf("volumed-%d", i+1) }

// startEmbeddedCluster runs n volumed processes, each with its own data
// dir and embedded nats-server, forming one JetStream cluster through the
// cluster {} routes of their nats.conf, as the README sets it up: the keys
// and CA made on the first host (`volumed creds`) and copied to the others before
// their first start; every process started at once, as an operator would,
// and each waited for until its health is healthy. Their device agents and
// NBD servers are off: the tests attach to a VM without one, and export
// nothing.
func startEmbeddedCluster(t *testing.T, sim cloud, n int) []*daemon {
	t.Helper()
	return startEmbeddedClusterOf(t, sim, n, volumedBin)
}

// startEmbeddedClusterOf is startEmbeddedCluster with the volumed binary
// bin (an older release's in the upgrade tests).
func startEmbeddedClusterOf(t *testing.T, sim cloud, n int, bin string) []*daemon {
	t.Helper()
	dirs := make([]string, n)
	clientPorts, clusterPorts := make([]int, n), make([]int, n)
	var routes []string
	for i := range n {
		dirs[i] = t.TempDir()
		clientPorts[i], clusterPorts[i] = testenv.FreePort(t), testenv.FreePort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", clusterPorts[i]))
	}
	// Host 1 makes the keys; hosts 2 and 3 get a copy before they start.
	var stderr strings.Builder
	cmd := exec.Command(bin, "creds", "server-config", "--data-dir", dirs[0])
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("volumed creds server-config: %v\n%s", err, stderr.String())
	}
	for _, dir := range dirs[1:] {
		copyKeys(t, filepath.Join(dirs[0], "creds", "keys"), filepath.Join(dir, "creds", "keys"))
		// The CA too: members present certificates of it on their routes
		// (an older release makes none).
		if bin == volumedBin {
			copyKeys(t, filepath.Join(dirs[0], pki.DirName), filepath.Join(dir, pki.DirName))
		}
	}
	ds := make([]*daemon, n)
	for i, dir := range dirs {
		conf := filepath.Join(dir, "nats.conf")
		body := fmt.Sprintf("server_name: %s\nlisten: 127.0.0.1:%d\njetstream { store_dir: %q }\n"+
			"cluster {\n  name: volumed\n  listen: 127.0.0.1:%d\n  routes: [%s]\n}\n",
			embeddedMember(i), clientPorts[i], filepath.Join(dir, "nats"), clusterPorts[i], strings.Join(routes, ", "))
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		ds[i] = newDaemon(t, sim, daemonOpts{dataDir: dir, natsConfig: conf,
			natsConfigURL: fmt.Sprintf("nats://127.0.0.1:%d", clientPorts[i]), extra: []string{"--device-agent=false", "--nbd-listen="}})
		ds[i].bin = bin
	}
	for _, d := range ds {
		d.launch()
	}
	t.Cleanup(func() { stopAll(ds) })
	t.Cleanup(func() {
		if t.Failed() {
			for i, d := range ds {
				t.Logf("log of %s:\n%s", embeddedMember(i), d.out.String())
			}
		}
	})
	for _, d := range ds {
		d.awaitHealthy(90 * time.Second)
	}
	return ds
}

// copyKeys copies the NATS keys of one data dir into another's, with the
// modes the README asks for (directory 0700, files 0600).
func copyKeys(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil || len(entries) == 0 {
		t.Fatalf("keys in %s: %v %v", from, entries, err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// stopAll sends SIGTERM to every running daemon at once, then waits for
// each (one by one, the last members would lose their quorum while the
// others stop).
func stopAll(ds []*daemon) {
	var running []*daemon
	for _, d := range ds {
		select {
		case <-d.exited:
		default:
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			running = append(running, d)
		}
	}
	for _, d := range running {
		d.awaitStop()
	}
}

// awaitHealthy polls the daemon's health until it is healthy (its store
// and CloudStack answer), failing if the process exits first or the
// timeout passes.
func (d *daemon) awaitHealthy(timeout time.Duration) {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		if resp, err := http.Get(d.api + "/health"); err == nil {
			var h commands.Health
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && json.Unmarshal(body, &h) == nil && h.Status == commands.Healthy {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, body)
		}
		select {
		case <-d.exited:
			d.t.Fatalf("volumed exited before it was healthy:\n%s", d.out.String())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("volumed not healthy within %v (last: %s):\n%s", timeout, last, d.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// requireReplicated checks that every stream volumed uses, and the state
// bucket's, has three replicas on the three members, all current.
func requireReplicated(t *testing.T, d *daemon) {
	t.Helper()
	js, err := jetstream.New(d.natsAs(bus.RoleDaemon))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{bus.StreamJobs, bus.StreamOps, bus.StreamDevices, "KV_" + state.DefaultKVBucket} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			last, ok := replicated(js, name)
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("stream %s not on three current members within 30s: %s", name, last)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// streamInfo reads a stream's info.
func streamInfo(js jetstream.JetStream, name string) (*jetstream.StreamInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil, err
	}
	return s.Info(ctx)
}

// replicated reports whether a stream has three replicas, all current,
// and otherwise what it has.
func replicated(js jetstream.JetStream, name string) (string, bool) {
	info, err := streamInfo(js, name)
	if err != nil {
		return err.Error(), false
	}
	if info.Config.Replicas != 3 || info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
		return fmt.Sprintf("replicas %d, cluster %+v", info.Config.Replicas, info.Cluster), false
	}
	for _, r := range info.Cluster.Replicas {
		if !r.Current || r.Offline {
			return fmt.Sprintf("replica %+v", *r), false
		}
	}
	return "", true
}

// roundTrip creates a volume through one instance, attaches it through
// another and detaches it through a third (each may answer 503 while the
// cluster elects new leaders), and requires one attach and one detach in
// CloudStack and the volume detached.
func roundTrip(t *testing.T, sim *cloudsim.Sim, name string, via ...*daemon) {
	t.Helper()
	at := func(i int) *daemon { return via[i%len(via)] }
	op := submitEventually(t, at(0), http.MethodPost, "/volumes", map[string]any{"name": name,
		"size": 1 << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	vol := at(1).completed(op.ID).VolumeID
	at(2).completed(submitEventually(t, at(1), http.MethodPost, "/volumes/"+vol+"/attach",
		map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	at(0).completed(submitEventually(t, at(2), http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
	if st := sim.Stats(); st.AttachesSucceeded[vol] != 1 || st.DetachesSucceeded[vol] != 1 {
		t.Errorf("volume %s: CloudStack did %d attaches and %d detaches, want 1 and 1", vol, st.AttachesSucceeded[vol], st.DetachesSucceeded[vol])
	}
	var vs commands.VolumeStatus
	at(1).mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &vs)
	if vs.VMID != nil {
		t.Errorf("volume %s attached to %s after its detach", vol, *vs.VMID)
	}
}

// TestClusterEmbedded runs three volumed processes whose embedded NATS
// servers form one JetStream cluster through cluster {} routes (the
// README's setup), started at once, and checks, in turn: every stream and
// the state bucket on three replicas and the credentials shared; commands
// on one volume interleaved through the instances, in order and once
// each; kill -9 of the instance whose server leads the job queue (one of
// the three JetStream peers gone), the other two carrying on; the killed
// instance restarted on its data dir, rejoining and serving.
func TestClusterEmbedded(t *testing.T) {
	sim := startSim(t, cloudsim.Config{Seed: 9})
	began := time.Now()
	ds := startEmbeddedCluster(t, sim, 3)
	t.Logf("three embedded members healthy in %v", time.Since(began).Round(time.Millisecond))

	t.Run("one cluster, one authority", func(t *testing.T) {
		requireReplicated(t, ds[0])
		// Every member trusts the same operator: one's credentials open another's server.
		for i, d := range ds {
			other := ds[(i+1)%len(ds)]
			nc, err := nats.Connect(d.natsURL, nats.UserCredentials(other.credsFile(bus.RoleOperator)))
			if err != nil {
				t.Fatalf("%s with the operator credentials of %s: %v", embeddedMember(i), embeddedMember((i+1)%len(ds)), err)
			}
			nc.Close()
		}
	})

	t.Run("interleaved attach and detach through different instances", func(t *testing.T) {
		vol := ds[0].createVolume("embedded-interleaved", 1)
		attach := map[string]string{"vm_id": cloudsim.RemoteVMID}
		var ops []commands.Operation
		for round := range 4 {
			d := ds[(round+1)%len(ds)]
			if round%2 == 0 {
				ops = append(ops, d.submit(http.MethodPost, "/volumes/"+vol+"/attach", attach))
			} else {
				ops = append(ops, d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil))
			}
		}
		var ids []string
		for i, op := range ops {
			done := ds[i%len(ds)].completed(op.ID)
			want := "Volume detached successfully"
			if i%2 == 0 {
				want = "Volume attached successfully"
			}
			if done.Response == nil || done.Response.Message != want {
				t.Errorf("%s %s answered %+v, want %q: it ran out of order", op.Type, op.ID, done.Response, want)
			}
			ids = append(ids, op.ID)
		}
		requireRanInOrder(t, ds[2], ids)
		if st := sim.Stats(); st.AttachesSucceeded[vol] != 2 || st.DetachesSucceeded[vol] != 2 {
			t.Errorf("CloudStack did %d attaches and %d detaches, want 2 and 2", st.AttachesSucceeded[vol], st.DetachesSucceeded[vol])
		}
		var vs commands.VolumeStatus
		ds[1].mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &vs)
		if vs.VMID != nil {
			t.Errorf("volume attached to %s, but the last command was a detach", *vs.VMID)
		}
	})

	// The member whose server leads the job queue: its loss makes the
	// others elect a new leader for it.
	js, err := jetstream.New(ds[0].natsAs(bus.RoleDaemon))
	if err != nil {
		t.Fatal(err)
	}
	info, err := streamInfo(js, bus.StreamJobs)
	if err != nil || info.Cluster == nil {
		t.Fatalf("jobs stream: %+v %v", info, err)
	}
	victim := -1
	for i := range ds {
		if embeddedMember(i) == info.Cluster.Leader {
			victim = i
		}
	}
	if victim < 0 {
		t.Fatalf("jobs stream led by %q, not a member", info.Cluster.Leader)
	}
	survivors := append(append([]*daemon{}, ds[victim+1:]...), ds[:victim]...)

	t.Run("kill -9 of one instance and its NATS server", func(t *testing.T) {
		ds[victim].kill9()
		roundTrip(t, sim, "embedded-after-kill", survivors...)
	})

	t.Run("the killed instance restarted rejoins", func(t *testing.T) {
		ds[victim].launch()
		ds[victim].awaitHealthy(60 * time.Second)
		requireReplicated(t, ds[victim])
		roundTrip(t, sim, "embedded-after-restart", ds[victim], survivors[0], survivors[1])
	})
}
