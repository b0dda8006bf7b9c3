package bus_test

import (
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/testenv"
)

// TestOnlyOperatorsSendCommands: CommandRequester holds because the
// operator role is the only one the server lets publish a command; the
// daemon's identity, observer and an agent are refused.
func TestOnlyOperatorsSendCommands(t *testing.T) {
	b := testenv.StartBus(t)
	got := make(chan *nats.Msg, 4)
	sub, err := b.Conn().ChanSubscribe("volumes.cmd.>", got)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	for _, role := range []string{bus.RoleDaemon, bus.RoleObserver} {
		nc, v := connect(t, b, b.CredsFile(role))
		if err := nc.Publish("volumes.cmd.create", []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		_ = nc.Flush()
		v.Await(t, "volumes.cmd.create")
	}
	nc, _ := connect(t, b, b.CredsFile(bus.RoleOperator))
	if err := nc.Publish("volumes.cmd.create", []byte(`operator`)); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	if m := <-got; string(m.Data) != "operator" {
		t.Fatalf("a command of another role reached volumed: %s", m.Data)
	}
	if bus.CommandRequester != "nats:operator" {
		t.Fatalf("CommandRequester %q", bus.CommandRequester)
	}
}
