package bus_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// connect connects to b with a credentials file, recording violations.
func connect(t *testing.T, b *bus.Bus, creds string, opts ...nats.Option) (*nats.Conn, *testenv.Violations) {
	t.Helper()
	v := &testenv.Violations{}
	nc, err := nats.Connect(b.ClientURL(), append([]nats.Option{nats.UserCredentials(creds),
		nats.ErrorHandler(v.Handler)}, opts...)...)
	if err != nil {
		t.Fatalf("connect with %s: %v", creds, err)
	}
	t.Cleanup(nc.Close)
	return nc, v
}

func TestRoleCredentialsFiles(t *testing.T) {
	dir := t.TempDir()
	b := testenv.StartBusIn(t, dir)
	for _, role := range []string{bus.RoleDaemon, bus.RoleOperator, bus.RoleObserver} {
		path := filepath.Join(dir, "creds", role+".creds")
		if got := b.CredsFile(role); got != path {
			t.Errorf("CredsFile(%s) = %s, want %s", role, got, path)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", path, fi.Mode().Perm())
		}
		data, _ := os.ReadFile(path)
		if !strings.Contains(string(data), "BEGIN NATS USER JWT") || !strings.Contains(string(data), "BEGIN USER NKEY SEED") {
			t.Errorf("%s is not a NATS creds file:\n%s", path, data)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, "creds", "keys"))
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("keys directory: %v %v, want mode 0700", fi, err)
	}
}

func TestAnonymousClientRefused(t *testing.T) {
	b := testenv.StartBus(t)
	if nc, err := nats.Connect(b.ClientURL(), nats.NoReconnect()); err == nil {
		nc.Close()
		t.Fatal("an anonymous client connected")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("anonymous connect: %v, want an authorization violation", err)
	}
	// Credentials of another volumed (another authority) are refused too.
	other := testenv.StartBus(t)
	if nc, err := nats.Connect(b.ClientURL(), nats.NoReconnect(),
		nats.UserCredentials(other.CredsFile(bus.RoleOperator))); err == nil {
		nc.Close()
		t.Fatal("a client with another authority's credentials connected")
	}
}

func TestCredentialsSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(b.CredsFile(bus.RoleOperator))
	if err != nil {
		t.Fatal(err)
	}
	_ = b.Close(context.Background())
	kept := filepath.Join(t.TempDir(), "operator.creds")
	if err := os.WriteFile(kept, old, 0o600); err != nil {
		t.Fatal(err)
	}
	b2 := testenv.StartBusIn(t, dir)
	connect(t, b2, kept) // fails the test if the old credentials are refused
}

// TestOperatorRole: the operator sends commands and replays events, but
// cannot purge or delete the job stream, consumers or the state bucket,
// nor read the job queue.
func TestOperatorRole(t *testing.T) {
	b := testenv.StartBus(t)
	ctx := context.Background()
	js := b.JetStream()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: state.DefaultKVBucket})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+"op-1", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, bus.StreamJobs, jetstream.ConsumerConfig{Durable: "handlers"}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "volumes.ops.op-1", []byte(`{"id":"op-1","status":"pending"}`)); err != nil {
		t.Fatal(err)
	}
	// The daemon answers commands.
	cmd, err := b.Conn().Subscribe("volumes.cmd.create", func(m *nats.Msg) { _ = m.Respond([]byte(`accepted`)) })
	if err != nil {
		t.Fatal(err)
	}
	defer cmd.Unsubscribe()
	_ = b.Conn().Flush()

	nc, v := connect(t, b, b.CredsFile(bus.RoleOperator))
	reply, err := nc.Request("volumes.cmd.create", []byte(`{}`), 5*time.Second)
	if err != nil || string(reply.Data) != "accepted" {
		t.Fatalf("operator command: %v %v", reply, err)
	}
	ojs, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	replayed := replay(t, ojs, bus.StreamOps, "volumes.ops.op-1")
	if replayed != `{"id":"op-1","status":"pending"}` {
		t.Fatalf("replayed %q", replayed)
	}
	if _, err := ojs.Stream(ctx, bus.StreamDevices); err != nil {
		t.Fatalf("operator stream info: %v", err)
	}
	info, err := b.Conn().Subscribe("$SRV.INFO.volumed", func(m *nats.Msg) { _ = m.Respond([]byte(`{}`)) })
	if err != nil {
		t.Fatal(err)
	}
	defer info.Unsubscribe()
	_ = b.Conn().Flush()
	if _, err := nc.Request("$SRV.INFO.volumed", nil, 5*time.Second); err != nil {
		t.Fatalf("operator service discovery: %v", err)
	}

	v.Refused(t, "$JS.API.STREAM.PURGE."+bus.StreamJobs, func(ctx context.Context) error {
		s, err := ojs.Stream(ctx, bus.StreamJobs)
		if err != nil {
			return err
		}
		return s.Purge(ctx)
	})
	v.Refused(t, "$JS.API.STREAM.PURGE."+bus.StreamOps, func(ctx context.Context) error {
		s, err := ojs.Stream(ctx, bus.StreamOps)
		if err != nil {
			return err
		}
		return s.Purge(ctx)
	})
	v.Refused(t, "$JS.API.STREAM.DELETE."+bus.StreamJobs, func(ctx context.Context) error {
		return ojs.DeleteStream(ctx, bus.StreamJobs)
	})
	v.Refused(t, "$JS.API.STREAM.DELETE.KV_"+state.DefaultKVBucket, func(ctx context.Context) error {
		return ojs.DeleteKeyValue(ctx, state.DefaultKVBucket)
	})
	v.Refused(t, "$JS.API.CONSUMER.DELETE."+bus.StreamJobs+".handlers", func(ctx context.Context) error {
		return ojs.DeleteConsumer(ctx, bus.StreamJobs, "handlers")
	})
	v.Refused(t, "$KV."+state.DefaultKVBucket+".k", func(ctx context.Context) error {
		okv, err := ojs.KeyValue(ctx, state.DefaultKVBucket)
		if err != nil {
			return err
		}
		_, err = okv.Put(ctx, "k", []byte("forged"))
		return err
	})
	// A consumer on the work queue would take jobs away from volumed.
	v.Refused(t, "$JS.API.CONSUMER.CREATE."+bus.StreamJobs+".thief", func(ctx context.Context) error {
		_, err := ojs.CreateConsumer(ctx, bus.StreamJobs, jetstream.ConsumerConfig{Name: "thief"})
		return err
	})

	// Nothing changed.
	s, err := js.Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(ctx); err != nil || info.State.Msgs != 1 || info.State.Consumers != 1 {
		t.Fatalf("job stream after the operator's attempts: %+v %v, want 1 message and 1 consumer", info, err)
	}
	if e, err := kv.Get(ctx, "k"); err != nil || string(e.Value()) != "v" {
		t.Fatalf("state bucket after the operator's attempts: %v %v", e, err)
	}
}

// replay reads the first message of subject from stream with an ordered
// consumer, as a late subscriber does.
func replay(t *testing.T, js jetstream.JetStream, stream, subject string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	msg, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil {
		t.Fatalf("replay %s: %v", subject, err)
	}
	return string(msg.Data())
}

// TestObserverRole: the observer replays events but cannot send a command.
func TestObserverRole(t *testing.T) {
	b := testenv.StartBus(t)
	ctx := context.Background()
	if _, err := b.JetStream().Publish(ctx, "volumes.ops.op-2", []byte(`{"id":"op-2"}`)); err != nil {
		t.Fatal(err)
	}
	got := make(chan *nats.Msg, 1)
	sub, err := b.Conn().ChanSubscribe("volumes.cmd.>", got)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	_ = b.Conn().Flush()
	nc, v := connect(t, b, b.CredsFile(bus.RoleObserver))
	ojs, _ := jetstream.New(nc)
	if s := replay(t, ojs, bus.StreamOps, "volumes.ops.op-2"); s != `{"id":"op-2"}` {
		t.Fatalf("observer replayed %q", s)
	}
	if err := nc.Publish("volumes.cmd.delete", []byte(`{"volume_id":"x"}`)); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	v.Await(t, "volumes.cmd.delete")
	select {
	case m := <-got:
		t.Fatalf("the observer's command reached volumed: %s %s", m.Subject, m.Data)
	default:
	}
}

// TestAgentIdentity: an agent publishes and answers only for its own VM.
func TestAgentIdentity(t *testing.T) {
	dir := t.TempDir()
	b := testenv.StartBusIn(t, dir)
	ctx := context.Background()
	a, err := bus.LoadAuthority(filepath.Join(dir, "creds"))
	if err != nil {
		t.Fatal(err)
	}
	const mine, other = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
	creds, err := a.AgentCreds(mine)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "agent.creds")
	if err := os.WriteFile(path, creds, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.AgentCreds("a.b"); err == nil {
		t.Error("agent credentials minted for a VM id with a dot")
	}
	nc, v := connect(t, b, path, nats.CustomInboxPrefix(bus.AgentInboxPrefix(mine)))
	ajs, _ := jetstream.New(nc)

	if _, err := ajs.Publish(ctx, "devices."+mine+".add", []byte(`{"name":"vdb"}`)); err != nil {
		t.Fatalf("agent publishes its own device event: %v", err)
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = ajs.Publish(pctx, "devices."+other+".add", []byte(`{"name":"vdb"}`))
	cancel()
	if err == nil {
		t.Fatal("agent published another VM's device event")
	}
	v.Await(t, "devices."+other+".add")
	s, err := b.JetStream().Stream(ctx, bus.StreamDevices)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("devices.>"))
	if err != nil || info.State.Msgs != 1 || info.State.Subjects["devices."+other+".add"] != 0 {
		t.Fatalf("device stream: %+v %v, want only the agent's own event", info.State, err)
	}

	// It answers its own list requests, and cannot take another VM's.
	if _, err := nc.Subscribe("devices."+mine+".list", func(m *nats.Msg) { _ = m.Respond([]byte(`[]`)) }); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Subscribe("devices."+other+".list", func(m *nats.Msg) { _ = m.Respond([]byte(`[{"forged":true}]`)) }); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	v.Await(t, "devices."+other+".list")
	if reply, err := b.Conn().Request("devices."+mine+".list", nil, 5*time.Second); err != nil || string(reply.Data) != "[]" {
		t.Fatalf("list request to the agent: %v %v", reply, err)
	}
	if _, err := b.Conn().Request("devices."+other+".list", nil, time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("another VM's list request: %v, want no responders", err)
	}
	// Nor send commands.
	if err := nc.Publish("volumes.cmd.delete", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	v.Await(t, "volumes.cmd.delete")
}

func TestNATSConfigWithAuthorizationRefused(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(conf, []byte("listen: 127.0.0.1:-1\nauthorization { token: s3cret }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := bus.New(bus.Config{ConfigFile: conf, DataDir: t.TempDir()}).Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "authorization") {
		t.Fatalf("start with an authorization block: %v, want a refusal", err)
	}
}

func TestServerConfigForExternalServer(t *testing.T) {
	// A nats-server run from the configuration volumed writes (here
	// through the embedding API) takes the daemon's credentials and
	// refuses others.
	ext, credsDir := externalServer(t)
	b := bus.New(bus.Config{URL: ext, Creds: bus.CredsFile(credsDir, bus.RoleDaemon)})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("daemon on the external server: %v", err)
	}
	defer b.Close(context.Background())
	if nc, err := nats.Connect(ext, nats.NoReconnect()); err == nil {
		nc.Close()
		t.Fatal("anonymous client let in by the external server")
	}
}

// runServer runs a NATS server from a configuration file, as nats-server
// -c would, and returns its client URL.
func runServer(t *testing.T, conf string) string {
	t.Helper()
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("config %s: %v", conf, err)
	}
	opts.NoSigs = true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	return srv.ClientURL()
}

// TestAuthorityConcurrentFirstUse: processes making the keys at once end
// with one authority (credentials of one are valid for the others).
func TestAuthorityConcurrentFirstUse(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	const n = 8
	creds := make([][]byte, n)
	errs := make(chan error, n)
	for i := range n {
		go func() {
			a, err := bus.LoadAuthority(dir)
			if err == nil {
				creds[i], err = a.Creds(bus.RoleOperator)
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	b := testenv.StartBusIn(t, filepath.Dir(dir))
	for i, c := range creds {
		path := filepath.Join(t.TempDir(), "op.creds")
		if err := os.WriteFile(path, c, 0o600); err != nil {
			t.Fatal(err)
		}
		nc, err := nats.Connect(b.ClientURL(), nats.UserCredentials(path), nats.NoReconnect())
		if err != nil {
			t.Fatalf("credentials %d of the concurrent first use refused: %v", i, err)
		}
		nc.Close()
	}
}

// TestConsumerCopiesAreIgnored: an observer's push consumer can deliver
// stored operation events onto a request subject an agent subscribes to
// by name; Published handlers ignore those copies and still take requests.
func TestConsumerCopiesAreIgnored(t *testing.T) {
	b := testenv.StartBus(t)
	ctx := context.Background()
	const subject = "devices.vm-1.names"
	got := make(chan *nats.Msg, 4)
	handled := make(chan *nats.Msg, 4)
	if _, err := b.Conn().Subscribe(subject, func(m *nats.Msg) {
		got <- m
		bus.Published(func(m *nats.Msg) { handled <- m; _ = m.Respond([]byte(`{}`)) })(m)
	}); err != nil {
		t.Fatal(err)
	}
	_ = b.Conn().Flush()
	if _, err := b.JetStream().Publish(ctx, "volumes.ops.op-3", []byte(`{"id":"op-3"}`)); err != nil {
		t.Fatal(err)
	}
	nc, _ := connect(t, b, b.CredsFile(bus.RoleObserver))
	legacy, err := nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := legacy.AddConsumer(bus.StreamOps, &nats.ConsumerConfig{DeliverSubject: subject,
		AckPolicy: nats.AckExplicitPolicy, DeliverPolicy: nats.DeliverAllPolicy}); err != nil {
		t.Fatalf("observer push consumer: %v", err)
	}
	select {
	case m := <-got:
		if !bus.FromConsumer(m) {
			t.Fatalf("a consumer's copy on %s (reply %q) not recognized", m.Subject, m.Reply)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the observer's consumer delivered nothing: the test proves nothing")
	}
	// A real request after it is handled; the copy before it was not.
	if _, err := b.Conn().Request(subject, []byte(`{"names":{}}`), 5*time.Second); err != nil {
		t.Fatalf("real request: %v", err)
	}
	if m := <-handled; bus.FromConsumer(m) || len(handled) != 0 {
		t.Fatalf("handled %s (reply %q), %d more", m.Data, m.Reply, len(handled))
	}
}

// TestReplyAllowed: volumed answers on a client's inbox, never on a
// subject of the server or of volumed's own.
func TestReplyAllowed(t *testing.T) {
	for _, tc := range []struct {
		reply string
		want  bool
	}{
		{"_INBOX.abc.1", true},
		{"_INBOX_mine.x", true},
		{"replies.team-a", true},
		{"$KV.volumed_state.map.vol-1", false},
		{"$JS.API.STREAM.DELETE.VOLUMED_JOBS", false},
		{"$SRV.PING", false},
		{"$SYS.REQ.SERVER.PING", false},
		{"volumed.jobs.v1.op-1", false},
		{"volumed.hosts.vm-1.exports", false},
		{"volumes.ops.op-1", false},
		{"volumes.cmd.delete", false},
		{"devices.vm-1.add", false},
		{"_INBOX_volumed.x", false},
		{"_INBOX_agent.vm-1.x", false},
	} {
		if got := bus.ReplyAllowed(tc.reply); got != tc.want {
			t.Errorf("ReplyAllowed(%q) = %v, want %v", tc.reply, got, tc.want)
		}
	}
}

// TestServiceConnOnExternalServer: on an external server that trusts
// volumed's authority, the command service connects with ServiceCreds and
// may publish on inboxes only: what a requester makes it publish
// elsewhere (a reply subject of volumed's own) never arrives. Without
// ServiceCreds it would answer with the daemon's identity.
func TestServiceConnOnExternalServer(t *testing.T) {
	ext, credsDir := externalServer(t)
	b := bus.New(bus.Config{URL: ext, Creds: bus.CredsFile(credsDir, bus.RoleDaemon),
		ServiceCreds: bus.CredsFile(credsDir, bus.RoleService)})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("daemon on the external server: %v", err)
	}
	defer b.Close(context.Background())
	if b.ServiceConn() == b.Conn() {
		t.Fatal("the command service answers on the daemon's connection")
	}
	// One subscription: its messages come in the order published.
	got := make(chan string, 64)
	sub, err := b.Conn().Subscribe(">", func(m *nats.Msg) { got <- m.Subject })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	for _, subj := range []string{"volumed.probe", "_INBOX.probe"} {
		if err := b.ServiceConn().Publish(subj, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.ServiceConn().Flush(); err != nil {
		t.Fatal(err)
	}
	// Published in order from one connection: the inbox's arriving means
	// the other was dropped, not late.
	for s := range got {
		if s == "volumed.probe" {
			t.Fatal("the command service published on volumed.probe")
		}
		if s == "_INBOX.probe" {
			break
		}
	}
}

// TestInboxReply: the device agent answers on inboxes only.
func TestInboxReply(t *testing.T) {
	for _, tc := range []struct {
		reply string
		want  bool
	}{
		{"_INBOX.abc.1", true},
		{"_INBOX_volumed.abc.1", true},
		{"_INBOX_agent.vm-1.abc", true},
		{"_INBOX_mine.x", false},
		{"_INBOX", false},
		{"", false},
		{"$KV.volumed_state.map.vol-1", false},
		{"volumed.hosts.vm-1.exports", false},
		{"devices.vm-1.add", false},
	} {
		if got := bus.InboxReply(tc.reply); got != tc.want {
			t.Errorf("InboxReply(%q) = %v, want %v", tc.reply, got, tc.want)
		}
	}
}

// externalServer runs a nats-server from the configuration volumed writes
// for an external server (ServerConfig), with every role's credentials
// written; it returns its URL and the credentials' directory.
func externalServer(t *testing.T) (url, credsDir string) {
	t.Helper()
	dir := t.TempDir()
	credsDir = filepath.Join(dir, "creds")
	a, err := bus.LoadAuthority(credsDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.WriteRoleCreds(); err != nil {
		t.Fatal(err)
	}
	frag, err := a.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "nats-server.conf")
	body := "listen: 127.0.0.1:-1\njetstream { store_dir: \"" + filepath.Join(dir, "js") + "\" }\n" + frag
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return runServer(t, conf), credsDir
}
