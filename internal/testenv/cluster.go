package testenv

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// JSCluster is a JetStream cluster of nats-servers in the test process,
// joined by routes; Start runs one member.
type JSCluster struct {
	t      testing.TB
	routes []*url.URL
	ports  []int
	client []int    // each member's client port, kept across its restarts
	dirs   []string // each member's store, kept across its restarts
	// Srvs are the members by index, nil until started.
	Srvs []*server.Server
}

// NewJSCluster returns a cluster of n members, none started.
func NewJSCluster(t testing.TB, n int) *JSCluster {
	t.Helper()
	c := &JSCluster{t: t, ports: make([]int, n), client: make([]int, n), dirs: make([]string, n), Srvs: make([]*server.Server, n)}
	for i := range c.ports {
		c.ports[i], c.client[i] = FreePort(t), FreePort(t)
		c.routes = append(c.routes, &url.URL{Scheme: "nats-route", Host: fmt.Sprintf("127.0.0.1:%d", c.ports[i])})
	}
	return c
}

// Start runs member i (named s<i+1>), shut down when the test ends, and
// waits until it takes clients; a member started again keeps its store
// and its client port (a client of the member connects to it again).
func (c *JSCluster) Start(i int) *server.Server {
	c.t.Helper()
	if c.dirs[i] == "" {
		c.dirs[i] = c.t.TempDir()
	}
	srv, err := server.NewServer(&server.Options{ServerName: fmt.Sprintf("s%d", i+1), Host: "127.0.0.1", Port: c.client[i],
		JetStream: true, StoreDir: c.dirs[i], NoLog: true, NoSigs: true, Routes: c.routes,
		Cluster: server.ClusterOpts{Name: "test", Host: "127.0.0.1", Port: c.ports[i]}})
	if err != nil {
		c.t.Fatal(err)
	}
	srv.Start()
	c.t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		c.t.Fatalf("server %d not ready", i+1)
	}
	c.Srvs[i] = srv
	return srv
}

// MetaLeader waits up to 30 s for a member to lead the cluster's
// JetStream and returns its index.
func (c *JSCluster) MetaLeader() int {
	c.t.Helper()
	leader := -1
	Eventually(c.t, 30*time.Second, func() bool {
		for i, s := range c.Srvs {
			if s != nil && s.JetStreamIsLeader() {
				leader = i
			}
		}
		return leader >= 0
	}, "a meta leader")
	return leader
}

// Connect opens a JetStream client on member i, with opts, closed when
// the test ends. While member i is down the client reconnects to the
// members the cluster advertised, unless opts has
// nats.IgnoreDiscoveredServers.
func (c *JSCluster) Connect(i int, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	c.t.Helper()
	nc, err := nats.Connect(c.Srvs[i].ClientURL(), opts...)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		c.t.Fatal(err)
	}
	return nc, js
}

// StartJSCluster runs a whole cluster of n members and returns it and a
// JetStream client on its meta leader (where what it makes is led, too).
func StartJSCluster(t testing.TB, n int) (*JSCluster, jetstream.JetStream) {
	t.Helper()
	c := NewJSCluster(t, n)
	for i := range n {
		c.Start(i)
	}
	_, js := c.Connect(c.MetaLeader())
	return c, js
}

// Consumers lists the consumers of a stream: each one's name and the
// member that holds it ("" on a single server).
func Consumers(ctx context.Context, t testing.TB, js jetstream.JetStream, stream string) map[string]string {
	t.Helper()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	hosts := map[string]string{}
	for info := range s.ListConsumers(ctx).Info() {
		host := ""
		if info.Cluster != nil {
			host = info.Cluster.Leader
		}
		hosts[info.Name] = host
	}
	return hosts
}

// Bystander returns the index of the member named name if it leads
// neither the cluster's JetStream nor stream, else -1: the member a test
// can shut down leaving both leaders standing. It fails the test when no
// member has that name.
func (c *JSCluster) Bystander(name, stream string) int {
	c.t.Helper()
	for i, s := range c.Srvs {
		if s == nil || s.Name() != name {
			continue
		}
		if s.JetStreamIsLeader() || s.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, stream) {
			return -1
		}
		return i
	}
	c.t.Fatalf("%q is not a member of the cluster", name)
	return -1
}

// AnyBystander returns the index of a member that leads neither the
// cluster's JetStream nor stream (see Bystander); it fails the test when
// there is none.
func (c *JSCluster) AnyBystander(stream string) int {
	c.t.Helper()
	for _, s := range c.Srvs {
		if s != nil {
			if b := c.Bystander(s.Name(), stream); b >= 0 {
				return b
			}
		}
	}
	c.t.Fatalf("no member leads neither the cluster nor %s", stream)
	return -1
}

// StopAllBut shuts down every member but survivor and waits for each.
func (c *JSCluster) StopAllBut(survivor int) {
	for i, s := range c.Srvs {
		if i != survivor && s != nil {
			s.Shutdown()
			s.WaitForShutdown()
		}
	}
}

// OutlastOutage follows a call running while every member but survivor is
// down, which sends its end on done: it waits until logs says the call
// waits for the cluster ("jetstream not ready yet"), starts the other
// members again and waits for the call to end. The test fails if the call
// ends before, fails, or either wait passes 2 minutes.
func (c *JSCluster) OutlastOutage(survivor int, logs fmt.Stringer, done <-chan error) {
	c.t.Helper()
	asked := time.After(2 * time.Minute)
	for !strings.Contains(logs.String(), "jetstream not ready yet") {
		select {
		case err := <-done:
			c.t.Fatalf("ended with the members down: %v\n%s", err, logs)
		case <-asked:
			c.t.Fatalf("never asked again with the members down\n%s", logs)
		case <-time.After(20 * time.Millisecond):
		}
	}
	for i := range c.Srvs {
		if i != survivor {
			c.Start(i)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			c.t.Fatalf("once the members are back: %v\n%s", err, logs)
		}
	case <-time.After(2 * time.Minute):
		c.t.Fatalf("never ended once the members are back\n%s", logs)
	}
}
