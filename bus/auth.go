package bus

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/volumed/volumed/commands"
)

// Roles of the NATS identities volumed issues. Every identity is a user of
// one account (the volumed account, with JetStream) under volumed's own
// NATS operator; the embedded server trusts that operator and nothing else,
// so a client without a credential signed by it is not let in.
const (
	// RoleDaemon is volumed itself: everything in its account.
	RoleDaemon = "daemon"
	// RoleOperator sends commands, reads operation and device events and
	// replays them from their streams; it cannot purge or delete a stream,
	// a consumer or the state bucket, nor touch the job queue.
	RoleOperator = "operator"
	// RoleObserver is RoleOperator without commands: read-only.
	RoleObserver = "observer"
	// RoleAgent is a device agent's identity, one per VM (AgentCreds).
	RoleAgent = "agent"
	// RoleService is volumed's command service (Bus.ServiceConn): it takes
	// the commands and the service discovery requests ($SRV) and answers
	// them on _INBOX.> (operator's and observer's inboxes) and the
	// daemons' inboxes, and nowhere else. A reply subject is the requester's to choose: answered with
	// the daemon's identity, $SRV.PING with the reply subject of a state
	// record overwrote that record.
	RoleService = "service"
)

// Roles whose credentials volumed writes into the creds directory at start.
var fixedRoles = []string{RoleDaemon, RoleOperator, RoleObserver, RoleService}

// Inbox prefixes. The daemon and the agents take replies on inboxes no
// other identity may subscribe to; operator and observer keep the default
// _INBOX so the nats CLI works as it is.
const (
	daemonInboxPrefix = "_INBOX_volumed"
	agentInboxPrefix  = "_INBOX_agent."
)

// AgentInboxPrefix is the inbox prefix an agent of vmID must use
// (nats.CustomInboxPrefix): the only inboxes its identity may subscribe to.
func AgentInboxPrefix(vmID string) string { return agentInboxPrefix + vmID }

// agentReplyTTL bounds how long after a list or names request an agent
// may still answer it.
const agentReplyTTL = 5 * time.Minute

// Layout of the creds directory.
const (
	keysDir   = "keys"
	credsPerm = 0o600
	dirPerm   = 0o700
)

// CredsFile is the path of a role's credentials in the creds directory.
func CredsFile(credsDir, role string) string { return filepath.Join(credsDir, role+".creds") }

// AgentCredsFile is the default path of the agent credentials of vmID.
func AgentCredsFile(credsDir, vmID string) string {
	return CredsFile(credsDir, RoleAgent+"-"+vmID)
}

// Authority holds the keys volumed signs its NATS identities with: the
// NATS operator, the system account and the volumed account. They live
// in <creds dir>/keys (0600), made at first use, so credentials stay valid
// across restarts.
type Authority struct {
	dir                    string
	operator, sys, account nkeys.KeyPair
}

// LoadAuthority reads the keys under credsDir, making the directory and
// any missing key first.
func LoadAuthority(credsDir string) (*Authority, error) {
	if credsDir == "" {
		return nil, errors.New("bus: creds directory not set")
	}
	if err := os.MkdirAll(filepath.Join(credsDir, keysDir), dirPerm); err != nil {
		return nil, fmt.Errorf("bus: creds directory: %w", err)
	}
	a := &Authority{dir: credsDir}
	for _, k := range []struct {
		name   string
		dst    *nkeys.KeyPair
		create func() (nkeys.KeyPair, error)
	}{
		{"operator", &a.operator, nkeys.CreateOperator},
		{"system-account", &a.sys, nkeys.CreateAccount},
		{"account", &a.account, nkeys.CreateAccount},
	} {
		kp, err := loadOrCreateKey(filepath.Join(credsDir, keysDir, k.name+".nk"), k.create)
		if err != nil {
			return nil, err
		}
		*k.dst = kp
	}
	return a, nil
}

func loadOrCreateKey(path string, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, error) {
	seed, err := os.ReadFile(path)
	if err == nil {
		kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(seed))))
		if err != nil {
			return nil, fmt.Errorf("bus: key %s: %w", path, err)
		}
		return kp, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("bus: key %s: %w", path, err)
	}
	kp, err := create()
	if err != nil {
		return nil, fmt.Errorf("bus: new key: %w", err)
	}
	if seed, err = kp.Seed(); err != nil {
		return nil, fmt.Errorf("bus: new key: %w", err)
	}
	if err := WriteSecret(path, append(seed, '\n'), true); errors.Is(err, fs.ErrExist) {
		// Another process made it first: use that one.
		return loadOrCreateKey(path, create)
	} else if err != nil {
		return nil, err
	}
	return kp, nil
}

// WriteSecret writes data to path with mode 0600, atomically (a crash
// leaves the old file or the new one, never a part); exclusive fails with
// fs.ErrExist if the file exists (two processes making the same key).
func WriteSecret(path string, data []byte, exclusive bool) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("bus: write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(credsPerm); err == nil {
		_, err = tmp.Write(data)
		if err == nil {
			err = tmp.Sync()
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
	} else {
		tmp.Close()
	}
	if err == nil {
		if exclusive {
			err = os.Link(tmp.Name(), path)
		} else {
			err = os.Rename(tmp.Name(), path)
		}
	}
	if err != nil {
		return fmt.Errorf("bus: write %s: %w", path, err)
	}
	return nil
}

// pub is a key pair's public key; the keys are made by nkeys, so it
// cannot fail.
func pub(kp nkeys.KeyPair) string {
	p, err := kp.PublicKey()
	if err != nil {
		panic(err)
	}
	return p
}

// trust is the operator and account JWTs of an Authority.
type trust struct {
	op                    *jwt.OperatorClaims
	opJWT, sysJWT, accJWT string
}

// claims encodes the operator and account JWTs.
func (a *Authority) claims() (trust, error) {
	var t trust
	op := jwt.NewOperatorClaims(pub(a.operator))
	op.Name = "volumed"
	op.SystemAccount = pub(a.sys)
	var err error
	if t.opJWT, err = op.Encode(a.operator); err != nil {
		return t, fmt.Errorf("bus: operator JWT: %w", err)
	}
	if t.op, err = jwt.DecodeOperatorClaims(t.opJWT); err != nil {
		return t, fmt.Errorf("bus: operator JWT: %w", err)
	}
	sys := jwt.NewAccountClaims(pub(a.sys))
	sys.Name = "SYS"
	if t.sysJWT, err = sys.Encode(a.operator); err != nil {
		return t, fmt.Errorf("bus: system account JWT: %w", err)
	}
	acc := jwt.NewAccountClaims(pub(a.account))
	acc.Name = "volumed"
	acc.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: jwt.NoLimit, DiskStorage: jwt.NoLimit,
		Streams: jwt.NoLimit, Consumer: jwt.NoLimit, MaxAckPending: jwt.NoLimit}
	if t.accJWT, err = acc.Encode(a.operator); err != nil {
		return t, fmt.Errorf("bus: account JWT: %w", err)
	}
	return t, nil
}

// configureServer makes the embedded server trust this authority only:
// its operator, a memory resolver holding the two accounts, and no
// anonymous user.
func (a *Authority) configureServer(opts *server.Options) error {
	switch {
	case opts.Authorization != "" || opts.Username != "" || len(opts.Users) > 0 || len(opts.Nkeys) > 0 ||
		len(opts.Accounts) > 0 || len(opts.TrustedOperators) > 0 || len(opts.TrustedKeys) > 0 ||
		opts.AccountResolver != nil || opts.NoAuthUser != "" || opts.SystemAccount != "":
		return errors.New("bus: the nats config sets authorization, accounts or an operator; " +
			"volumed configures authorization of its embedded server itself (see docs/security.md)")
	}
	t, err := a.claims()
	if err != nil {
		return err
	}
	res := &server.MemAccResolver{}
	if err := res.Store(pub(a.sys), t.sysJWT); err != nil {
		return err
	}
	if err := res.Store(pub(a.account), t.accJWT); err != nil {
		return err
	}
	opts.TrustedOperators = []*jwt.OperatorClaims{t.op}
	opts.AccountResolver = res
	opts.SystemAccount = pub(a.sys)
	return nil
}

// ServerConfig is a nats-server configuration fragment that makes an
// external server (or cluster) trust this authority, for
// `include`: the operator JWT, the system account and a memory resolver
// preloaded with both accounts.
func (a *Authority) ServerConfig() (string, error) {
	t, err := a.claims()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("# Authorization for volumed's NATS identities (made by `volumed creds server-config`).\n"+
		"operator: %s\nsystem_account: %s\nresolver: MEMORY\nresolver_preload: {\n  %s: %s\n  %s: %s\n}\n",
		t.opJWT, pub(a.sys), pub(a.sys), t.sysJWT, pub(a.account), t.accJWT), nil
}

// Creds mints the credentials file (`nats --creds`) of a fixed role.
func (a *Authority) Creds(role string) ([]byte, error) {
	perms, ok := rolePermissions(role)
	if !ok {
		return nil, fmt.Errorf("bus: unknown role %q", role)
	}
	return a.mint(role, perms)
}

// AgentCreds mints the credentials of the device agent of vmID: it may
// publish only devices.<vmID>.>, take only its own list, names and users
// requests, and answer them.
func (a *Authority) AgentCreds(vmID string) ([]byte, error) {
	if vmID == "" || strings.ContainsAny(vmID, ".*> \t\r\n") {
		return nil, fmt.Errorf("bus: VM id %q cannot be a subject token", vmID)
	}
	return a.mint(RoleAgent+"-"+vmID, agentPermissions(vmID))
}

func (a *Authority) mint(name string, perms jwt.Permissions) ([]byte, error) {
	ukp, err := nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("bus: user key: %w", err)
	}
	uc := jwt.NewUserClaims(pub(ukp))
	uc.Name = name
	uc.Permissions = perms
	userJWT, err := uc.Encode(a.account)
	if err != nil {
		return nil, fmt.Errorf("bus: user JWT %s: %w", name, err)
	}
	seed, err := ukp.Seed()
	if err != nil {
		return nil, err
	}
	return jwt.FormatUserConfig(userJWT, seed)
}

// WriteRoleCreds writes the credentials of every fixed role into the creds
// directory (0600), replacing older ones: earlier copies stay valid, they
// are signed by the same account key.
func (a *Authority) WriteRoleCreds() error {
	for _, role := range fixedRoles {
		creds, err := a.Creds(role)
		if err != nil {
			return err
		}
		if err := WriteSecret(CredsFile(a.dir, role), creds, false); err != nil {
			return err
		}
	}
	return nil
}

// rolePermissions are the subject permissions of a fixed role.
func rolePermissions(role string) (jwt.Permissions, bool) {
	var p jwt.Permissions
	switch role {
	case RoleDaemon:
		p.Pub.Allow.Add(">")
		p.Pub.Deny.Add(commandSubjects) // CommandRequester
		p.Sub.Allow.Add(">")
	case RoleOperator:
		p.Pub.Allow.Add(commandSubjects)
		readEvents(&p)
	case RoleObserver:
		readEvents(&p)
	case RoleService:
		p.Sub.Allow.Add(commandSubjects, "$SRV.>")
		p.Pub.Allow.Add("_INBOX.>", daemonInboxPrefix+".>") // the daemons' discovery too
	default:
		return p, false
	}
	return p, true
}

// eventStreams are the streams operator and observer may replay.
var eventStreams = []string{StreamOps, StreamDevices}

// readEvents lets a role subscribe to operation, mapping and device events
// and replay the event streams: stream and consumer info, message gets,
// consumers of its own on those streams (ephemeral or ordered), their
// next-message requests, acks and flow control; and discover the command
// service. No purge, no delete, no job queue, no state bucket.
func readEvents(p *jwt.Permissions) {
	p.Sub.Allow.Add(opsSubject, commands.SubjectMappingsPrefix+">", "_INBOX.>")
	p.Sub.Allow.Add(deviceEventSubjects...)
	p.Pub.Allow.Add("$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "$JS.API.STREAM.INFO.*")
	// Service discovery of volumed's command service (nats micro).
	p.Pub.Allow.Add("$SRV.*", "$SRV.*."+commands.ServiceName, "$SRV.*."+commands.ServiceName+".*")
	for _, s := range eventStreams {
		p.Pub.Allow.Add(
			"$JS.API.STREAM.MSG.GET."+s,
			"$JS.API.DIRECT.GET."+s, "$JS.API.DIRECT.GET."+s+".>",
			"$JS.API.CONSUMER.CREATE."+s, "$JS.API.CONSUMER.CREATE."+s+".>",
			"$JS.API.CONSUMER.INFO."+s+".*",
			"$JS.API.CONSUMER.NAMES."+s, "$JS.API.CONSUMER.LIST."+s,
			"$JS.API.CONSUMER.MSG.NEXT."+s+".*",
			"$JS.ACK."+s+".>", "$JS.FC."+s+".>",
		)
	}
}

// agentPermissions are the permissions of the agent of vmID.
func agentPermissions(vmID string) jwt.Permissions {
	var p jwt.Permissions
	p.Pub.Allow.Add(commands.SubjectDevicesPrefix + vmID + ".>")
	p.Sub.Allow.Add(commands.DevicesListSubject(vmID), commands.DevicesNamesSubject(vmID), commands.DevicesUsersSubject(vmID),
		AgentInboxPrefix(vmID)+".>")
	p.Resp = &jwt.ResponsePermission{MaxMsgs: 1, Expires: agentReplyTTL}
	return p
}

// configureAuth makes the role credentials under the creds directory and
// sets the embedded server's authorization.
func (b *Bus) configureAuth(opts *server.Options) error {
	a, err := LoadAuthority(b.cfg.CredsDir)
	if err != nil {
		return err
	}
	if err := a.WriteRoleCreds(); err != nil {
		return err
	}
	return a.configureServer(opts)
}

// authOptions are the connection's credentials and inbox prefix.
func (b *Bus) authOptions() []nats.Option {
	var opts []nats.Option
	switch {
	case b.cfg.URL == "":
		opts = append(opts, nats.UserCredentials(CredsFile(b.cfg.CredsDir, RoleDaemon)))
	case b.cfg.Creds != "":
		opts = append(opts, nats.UserCredentials(b.cfg.Creds))
	}
	prefix := b.cfg.InboxPrefix
	if prefix == "" && !b.cfg.ClientOnly {
		prefix = daemonInboxPrefix
	}
	if prefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(prefix))
	}
	return opts
}

// CredsFile is the path of a role's credentials for the embedded server,
// "" with an external one.
func (b *Bus) CredsFile(role string) string {
	if b.srv == nil {
		return ""
	}
	return CredsFile(b.cfg.CredsDir, role)
}

// FromConsumer reports whether msg was delivered by a JetStream consumer
// (its reply is an ack subject) rather than published. A push consumer
// may deliver stored events to any subject someone subscribes to by name,
// so an identity allowed to make consumers (operator, observer) could
// replay them onto a request subject volumed or an agent acts on.
func FromConsumer(msg *nats.Msg) bool { return FromConsumerReply(msg.Reply) }

// FromConsumerReply reports whether a message with this reply subject was
// delivered by a JetStream consumer (its reply is the consumer's ack).
func FromConsumerReply(reply string) bool { return strings.HasPrefix(reply, "$JS.ACK.") }

// ReplyAllowed reports whether volumed may publish the answer to a request
// on its reply subject. A client sets the reply subject freely, and volumed
// publishes with its own identity, which may publish almost anywhere: a
// command with the reply subject $KV.volumed_state.<key> had volumed
// overwrite that state record with its answer. So no answer goes to a
// subject of the server ($: JetStream API, KV, services, system), to
// volumed's own subjects (volumed., volumes., devices.) or to volumed's
// or an agent's inboxes; a client's inbox (_INBOX.> or a prefix of its
// own) is fine.
func ReplyAllowed(reply string) bool {
	for _, p := range []string{"$", "volumed.", "volumes.", commands.SubjectDevicesPrefix,
		daemonInboxPrefix, agentInboxPrefix} {
		if strings.HasPrefix(reply, p) {
			return false
		}
	}
	return true
}

// InboxReply reports whether reply is an inbox: a client's (_INBOX.),
// volumed's or an agent's. What answers with the daemon's identity a
// request only volumed and agents send (the device agent's) answers only
// there, never on a subject a requester chose.
func InboxReply(reply string) bool {
	for _, p := range []string{"_INBOX.", daemonInboxPrefix + ".", agentInboxPrefix} {
		if strings.HasPrefix(reply, p) {
			return true
		}
	}
	return false
}

// Published wraps a handler of requests or events so that it ignores
// what a JetStream consumer delivered (FromConsumer).
func Published(h nats.MsgHandler) nats.MsgHandler {
	return func(msg *nats.Msg) {
		if !FromConsumer(msg) {
			h(msg)
		}
	}
}
