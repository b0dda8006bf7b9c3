package bus_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/testenv"
)

func TestStartCreatesStreamsIdempotently(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	for round := 0; round < 2; round++ {
		b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
		if err := b.Start(ctx); err != nil {
			t.Fatalf("round %d: start: %v", round, err)
		}
		for _, name := range []string{bus.StreamJobs, bus.StreamOps, bus.StreamDevices} {
			s, err := b.JetStream().Stream(ctx, name)
			if err != nil {
				t.Fatalf("round %d: stream %s: %v", round, name, err)
			}
			if name == bus.StreamJobs && s.CachedInfo().Config.Retention != jetstream.WorkQueuePolicy {
				t.Errorf("jobs stream retention = %v, want work queue", s.CachedInfo().Config.Retention)
			}
		}
		if round == 0 {
			if _, err := b.JetStream().Publish(ctx, "volumes.ops.op-1", []byte(`{}`)); err != nil {
				t.Fatalf("publish: %v", err)
			}
		} else {
			s, _ := b.JetStream().Stream(ctx, bus.StreamOps)
			info, err := s.Info(ctx)
			if err != nil || info.State.Msgs != 1 {
				t.Fatalf("ops stream after restart: msgs=%v err=%v, want the 1 message kept on file", info, err)
			}
		}
		if err := b.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if err := b.Close(ctx); err != nil {
			t.Fatalf("second close: %v", err)
		}
	}
}

func TestConfigFile(t *testing.T) {
	port := testenv.FreePort(t)
	conf := filepath.Join(t.TempDir(), "nats.conf")
	store := t.TempDir()
	body := "listen: 127.0.0.1:" + strconv.Itoa(port) + "\njetstream { store_dir: \"" + store + "\" }\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	b := bus.New(bus.Config{ConfigFile: conf, DataDir: t.TempDir()})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("start: %v", err)
	}
	defer b.Close(context.Background())
	if want := "nats://127.0.0.1:" + strconv.Itoa(port); b.ClientURL() != want {
		t.Errorf("client URL %s, want %s", b.ClientURL(), want)
	}
	if entries, _ := os.ReadDir(store); len(entries) == 0 {
		t.Errorf("store_dir %s from the config file is empty", store)
	}
	// A second Bus connects to the first one as an external server.
	ext := bus.New(bus.Config{URL: b.ClientURL(), Creds: b.CredsFile(bus.RoleDaemon)})
	if err := ext.Start(context.Background()); err != nil {
		t.Fatalf("external start: %v", err)
	}
	defer ext.Close(context.Background())
	if ext.Embedded() || !b.Embedded() {
		t.Error("Embedded() wrong")
	}
}

func TestBadConfigFile(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(conf, []byte("listen: {{{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := bus.New(bus.Config{ConfigFile: conf, DataDir: t.TempDir()}).Start(context.Background()); err == nil {
		t.Fatal("start with a malformed config file succeeded")
	}
}

// clusterConfs writes the nats.conf of n embedded servers forming one
// cluster through routes, and returns the files and the client URLs.
func clusterConfs(t *testing.T, n int, named bool) (confs, urls []string) {
	t.Helper()
	var routes []string
	clientPorts := make([]int, n)
	clusterPorts := make([]int, n)
	for i := range n {
		clientPorts[i], clusterPorts[i] = testenv.FreePort(t), testenv.FreePort(t)
		routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(clusterPorts[i]))
	}
	for i := range n {
		body := "listen: 127.0.0.1:" + strconv.Itoa(clientPorts[i]) + "\n"
		if named {
			body += "server_name: volumed-" + strconv.Itoa(i+1) + "\n"
		}
		body += "jetstream { store_dir: \"" + t.TempDir() + "\" }\n" +
			"cluster {\n  name: volumed\n  listen: 127.0.0.1:" + strconv.Itoa(clusterPorts[i]) + "\n" +
			"  routes: [" + strings.Join(routes, ", ") + "]\n}\n"
		conf := filepath.Join(t.TempDir(), "nats.conf")
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		confs = append(confs, conf)
		urls = append(urls, "nats://127.0.0.1:"+strconv.Itoa(clientPorts[i]))
	}
	return confs, urls
}

// TestEmbeddedCluster: three embedded servers form a JetStream cluster
// from their nats.conf routes, and the streams get three replicas; a
// client is given every URL. (The loss of a node is tested end to end in
// test/e2e TestCluster.)
func TestEmbeddedCluster(t *testing.T) {
	confs, urls := clusterConfs(t, 3, true)
	ctx := context.Background()
	buses := make([]*bus.Bus, len(confs))
	errs := make(chan error, len(confs))
	// The members of one cluster share their keys (README: copy creds/keys).
	credsDir := t.TempDir()
	for i, conf := range confs {
		buses[i] = bus.New(bus.Config{ConfigFile: conf, Replicas: 3, CredsDir: credsDir})
		go func() { errs <- buses[i].Start(ctx) }()
	}
	for range confs {
		if err := <-errs; err != nil {
			t.Fatalf("start: %v", err)
		}
	}
	for _, b := range buses {
		defer b.Close(ctx)
	}
	client := bus.New(bus.Config{URL: strings.Join(urls, ","), ClientOnly: true,
		Creds: filepath.Join(credsDir, bus.RoleDaemon+".creds")})
	if err := client.Start(ctx); err != nil {
		t.Fatalf("client with several URLs: %v", err)
	}
	defer client.Close(ctx)
	s, err := client.JetStream().Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil || info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("jobs stream: %+v %v, want 3 replicas on the cluster", info, err)
	}
	if info.Config.AllowDirect {
		t.Fatal("jobs stream: direct gets with 3 replicas: a follower would answer reads of the queue")
	}
}

// TestClusterNeedsServerNames: members of a cluster without server_name
// would all be called "volumed", which JetStream cannot tell apart.
func TestClusterNeedsServerNames(t *testing.T) {
	confs, _ := clusterConfs(t, 1, false)
	err := bus.New(bus.Config{ConfigFile: confs[0], DataDir: t.TempDir()}).Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "server_name") {
		t.Fatalf("start of a cluster member without server_name: %v", err)
	}
}
