package testenv

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
)

// StartBus starts an embedded NATS server with JetStream on a free
// loopback port, its files under a temporary directory, and closes it when
// the test ends.
func StartBus(t testing.TB) *bus.Bus {
	t.Helper()
	return StartBusIn(t, t.TempDir())
}

// StartBusIn is StartBus with the JetStream files under dir, so a test can
// restart a bus on the same data.
func StartBusIn(t testing.TB, dir string) *bus.Bus {
	t.Helper()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("start bus: %v", err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	return b
}

// Connect connects a client to an embedded bus with a role's credentials
// (bus.RoleDaemon, RoleOperator, RoleObserver) and closes it when the
// test ends.
func Connect(t testing.TB, b *bus.Bus, role string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(b.ClientURL(), append([]nats.Option{nats.UserCredentials(b.CredsFile(role))}, opts...)...)
	if err != nil {
		t.Fatalf("connect to the bus as %s: %v", role, err)
	}
	t.Cleanup(nc.Close)
	return nc
}
