package e2e_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/test/cloudsim"
)

// request does a NATS request/reply and returns the status header and body.
func request(t *testing.T, nc *nats.Conn, subject string, body any) (int, []byte) {
	t.Helper()
	data, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := nc.Request(subject, data, 10*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	status, err := strconv.Atoi(msg.Header.Get(commands.StatusHeader))
	if err != nil {
		t.Fatalf("reply on %s without a status header: %v", subject, msg.Header)
	}
	return status, msg.Data
}

// opEvent is one event of the volumes.ops stream.
type opEvent struct {
	ID     string
	Status commands.OpStatus
	// Op is the whole record the event carried.
	Op commands.Operation
}

// opEvents replays, from the stream's start, the events of the given
// operations in the order they were published.
func (d *daemon) opEvents(ids []string) []opEvent {
	d.t.Helper()
	js, err := jetstream.New(d.nats())
	if err != nil {
		d.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var subjects []string
	for _, id := range ids {
		subjects = append(subjects, commands.OpSubject(id))
	}
	cons, err := js.OrderedConsumer(ctx, bus.StreamOps, jetstream.OrderedConsumerConfig{FilterSubjects: subjects})
	if err != nil {
		d.t.Fatal(err)
	}
	// One pull subscription for the whole replay (each Next of its own
	// would make a consumer per event).
	msgs, err := cons.Messages()
	if err != nil {
		d.t.Fatal(err)
	}
	defer msgs.Stop()
	// Read up to the last event stored when each was delivered (none left
	// pending), not until a quiet second: a loaded machine can pause
	// longer than that in the middle of a replay.
	var events []opEvent
	for {
		msg, err := msgs.Next(jetstream.NextMaxWait(10 * time.Second))
		if err != nil {
			return events // none stored
		}
		var op commands.Operation
		if err := json.Unmarshal(msg.Data(), &op); err != nil {
			d.t.Fatalf("event %s: %v", msg.Data(), err)
		}
		events = append(events, opEvent{ID: op.ID, Status: op.Status, Op: op})
		meta, err := msg.Metadata()
		if err != nil {
			d.t.Fatal(err)
		}
		if meta.NumPending == 0 {
			return events
		}
	}
}

func TestNATSCommands(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	nc := d.nats()

	// Subscribe to every operation event before the first command.
	events := make(chan commands.Operation, 100)
	sub, err := nc.Subscribe(commands.SubjectOpsPrefix+">", func(m *nats.Msg) {
		var op commands.Operation
		if json.Unmarshal(m.Data, &op) == nil {
			events <- op
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	awaitTerminal := func(id string) commands.Operation {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case op := <-events:
				if op.ID == id && op.Status.Terminal() {
					return op
				}
			case <-timeout:
				t.Fatalf("no terminal event for %s", id)
			}
		}
	}
	run := func(subject string, body any) commands.Operation {
		t.Helper()
		status, data := request(t, nc, subject, body)
		var op commands.Operation
		if status != http.StatusCreated || json.Unmarshal(data, &op) != nil {
			t.Fatalf("%s: %d %s", subject, status, data)
		}
		done := awaitTerminal(op.ID)
		if done.Status != commands.StatusCompleted {
			t.Fatalf("%s: %+v", subject, done)
		}
		return done
	}

	created := run(commands.SubjectCreate, map[string]any{"name": "over-nats", "size": 3 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	vol := created.VolumeID
	run(commands.SubjectAttach, map[string]string{"volume_id": vol, "vm_id": cloudsim.RemoteVMID})
	run(commands.SubjectDetach, map[string]string{"volume_id": vol})
	run(commands.SubjectAttachRoot, map[string]string{"volume_id": vol, "vm_id": cloudsim.TestVMID})
	run(commands.SubjectDetach, map[string]string{"volume_id": vol})
	run(commands.SubjectDelete, map[string]string{"volume_id": vol})

	// Errors come back in the documented format with the HTTP status.
	status, data := request(t, nc, commands.SubjectCreate, map[string]any{"name": "small", "size": 1024,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	var apiErr commands.Error
	if status != http.StatusBadRequest || json.Unmarshal(data, &apiErr) != nil || apiErr.Code != commands.CodeInvalidRequest ||
		apiErr.Details["field"] != "size" {
		t.Fatalf("small create: %d %s", status, data)
	}
	status, data = request(t, nc, commands.SubjectDetach, map[string]string{"volume_id": "11111111-2222-3333-4444-555555555555"})
	if status != http.StatusNotFound {
		t.Fatalf("detach of an unknown volume: %d %s", status, data)
	}

	// A late subscriber replays the whole history of an operation.
	history := d.opEvents([]string{created.ID})
	if len(history) < 3 || history[0].Status != commands.StatusPending || history[len(history)-1].Status != commands.StatusCompleted {
		t.Fatalf("replayed history of the create: %v", history)
	}
}
