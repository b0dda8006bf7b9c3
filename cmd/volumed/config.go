package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/volumed/volumed/nbd"
)

// config is volumed's configuration, from flags with environment
// equivalents (a flag given on the command line wins).
type config struct {
	// agentOnly: `volumed agent`, the device agent alone.
	agentOnly    bool
	listen       string
	dataDir      string
	natsURL      string
	natsConfig   string
	natsReplicas int
	redisURL     string
	csURL        string
	csAPIKey     string
	csSecretKey  string
	vmID         string
	stepTimeout  time.Duration
	// stopGrace: how long a rollback's stop_vm waits for a graceful stop.
	stopGrace    time.Duration
	ackWait      time.Duration
	syncInterval time.Duration
	// opRetention: how long terminal operations are kept; 0 keeps them.
	opRetention time.Duration
	logLevel    slog.Level
	// Device agent and correlation.
	deviceAgent    bool
	scanInterval   time.Duration
	nameDir        string
	dmsetup        string
	correlateAfter time.Duration
	// NBD exports: nbdListen "" turns the NBD server off.
	nbdListen     string
	nbdAutoExport bool
	// Security (auth.go): natsCreds and natsServiceCreds for --nats-url;
	// the REST token.
	natsCreds        string
	natsServiceCreds string
	apiToken         string
	apiTokenFile     string
	// TLS and more tokens (tls.go).
	tls tlsFlags
	// pprofListen: the loopback address of net/http/pprof (pprof.go); "" off.
	pprofListen string
	// creds: `volumed creds` (creds.go) instead of the daemon.
	creds *credsCommand
}

// errUsage marks a configuration error (exit code 2).
var errUsage = errors.New("usage")

// flagSet collects string flags, parsed and validated after fs.Parse.
type flagSet struct {
	*flag.FlagSet
	bools     map[string]*boolFlag
	durations map[string]durationFlag
	level     *string
}

type durationFlag struct {
	s   *string
	dst *time.Duration
	min time.Duration
}

func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func (f *flagSet) str(dst *string, name, envName, def, usage string) {
	f.StringVar(dst, name, env(envName, def), usage+" ("+envName+")")
}

func (f *flagSet) boolean(name, envName, def, usage string) {
	v := boolFlag(env(envName, def))
	f.bools[name] = &v
	f.Var(&v, name, usage+" ("+envName+")")
}

// boolFlag is a boolean flag that also takes no value (--device-agent), kept as
// text until parse so a bad environment value is reported as a usage error.
type boolFlag string

func (b *boolFlag) String() string { return string(*b) }
func (b *boolFlag) Set(v string) error {
	if _, err := strconv.ParseBool(v); err != nil {
		return err
	}
	*b = boolFlag(v)
	return nil
}
func (b *boolFlag) IsBoolFlag() bool { return true }

func (f *flagSet) duration(dst *time.Duration, name, envName, def string, min time.Duration, usage string) {
	f.durations[name] = durationFlag{f.String(name, env(envName, def), usage+" ("+envName+")"), dst, min}
}

// parse parses args and converts the typed flags.
func (f *flagSet) parse(args []string, c *config) error {
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if f.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, f.Arg(0))
	}
	for name, d := range f.durations {
		v, err := time.ParseDuration(*d.s)
		if err != nil || v < d.min {
			return fmt.Errorf("%w: --%s: want a duration of at least %v, got %q", errUsage, name, d.min, *d.s)
		}
		*d.dst = v
	}
	if err := c.logLevel.UnmarshalText([]byte(*f.level)); err != nil {
		return fmt.Errorf("%w: --log-level: %w", errUsage, err)
	}
	return nil
}

func (f *flagSet) boolValue(name string) (bool, error) {
	v, err := strconv.ParseBool(string(*f.bools[name]))
	if err != nil {
		return false, fmt.Errorf("%w: --%s: %w", errUsage, name, err)
	}
	return v, nil
}

func newFlagSet(name, usage string, stderr io.Writer, c *config) *flagSet {
	f := &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), bools: map[string]*boolFlag{},
		durations: map[string]durationFlag{}}
	f.SetOutput(stderr)
	f.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s [flags]\n\n%s Flags:\n", name, usage)
		f.PrintDefaults()
	}
	f.level = f.String("log-level", env("VOLUMED_LOG_LEVEL", "info"), "debug, info, warn or error (VOLUMED_LOG_LEVEL)")
	f.str(&c.vmID, "vm-id", "VOLUMED_VM_ID", "", "the CloudStack VM this host is")
	f.duration(&c.scanInterval, "scan-interval", "VOLUMED_SCAN_INTERVAL", "30s", time.Second, "device agent full-scan interval")
	f.str(&c.nameDir, "name-dir", "VOLUMED_NAME_DIR", "/dev/disk/by-volume", "directory of the persistent names as symlinks, where device-mapper is not available")
	f.str(&c.dmsetup, "dmsetup", "VOLUMED_DMSETUP", "dmsetup", "dmsetup binary: with /dev/mapper/control, persistent names are dm linear devices in /dev/mapper")
	return f
}

// parseConfig parses the daemon's flags, or `agent` and its flags.
func parseConfig(args []string, stderr io.Writer) (config, error) {
	if len(args) > 0 && args[0] == "agent" {
		return parseAgentConfig(args[1:], stderr)
	}
	if len(args) > 0 && args[0] == "creds" {
		return parseCredsConfig(args[1:], stderr)
	}
	var c config
	f := newFlagSet("volumed", "volumed manages CloudStack block volumes for this host.\n"+
		"`volumed agent --help` shows the device agent alone.", stderr, &c)
	f.str(&c.listen, "listen", "VOLUMED_LISTEN", "127.0.0.1:8090", "REST API address")
	f.str(&c.dataDir, "data-dir", "VOLUMED_DATA_DIR", "./volumed-data", "data directory: JetStream files (nats/), NATS keys and credentials (creds/), the generated REST token (api-token), the embedded store's index cache (state-index.cache) and archive of ended operations (ops-archive/), volumed's CA and the NBD client certificates (tls/)")
	f.str(&c.natsURL, "nats-url", "VOLUMED_NATS_URL", "", "external NATS URL, or several comma-separated of one cluster; empty runs the embedded server")
	f.str(&c.natsConfig, "nats-config", "VOLUMED_NATS_CONFIG", "", "embedded server config file; default ./nats.conf when present")
	replicas := f.String("nats-replicas", env("VOLUMED_NATS_REPLICAS", "1"), "replicas of the streams and state bucket on a NATS cluster (VOLUMED_NATS_REPLICAS)")
	f.str(&c.redisURL, "redis-url", "VOLUMED_REDIS_URL", "", "Redis URL for state; empty uses the embedded store")
	f.str(&c.csURL, "cloudstack-url", "CLOUDSTACK_API_URL", "", "CloudStack API URL, e.g. http://host:8080/client/api")
	f.str(&c.csAPIKey, "cloudstack-api-key", "CLOUDSTACK_API_KEY", "", "CloudStack API key")
	f.str(&c.csSecretKey, "cloudstack-secret-key", "CLOUDSTACK_SECRET_KEY", "", "CloudStack secret key")
	f.duration(&c.stepTimeout, "step-timeout", "VOLUMED_STEP_TIMEOUT", "5m", time.Second, "deadline of each CloudStack step; an operation past it fails")
	f.duration(&c.stopGrace, "stop-grace", "VOLUMED_STOP_GRACE", "60s", time.Second, "how long a rollback waits for the test VM to stop gracefully before it forces the stop")
	f.duration(&c.ackWait, "ack-wait", "VOLUMED_ACK_WAIT", "15s", time.Second, "how soon a job is redelivered after a crash")
	f.duration(&c.syncInterval, "sync-interval", "VOLUMED_SYNC_INTERVAL", "5m", 0, "period of the background reconcile; 0 turns it off")
	f.duration(&c.opRetention, "op-retention", "VOLUMED_OP_RETENTION", "720h", 0, "how long terminal operations are kept after they end; 0 keeps them forever")
	f.boolean("device-agent", "VOLUMED_DEVICE_AGENT", "true", "run the device agent for --vm-id in this process")
	f.duration(&c.correlateAfter, "correlation-timeout", "VOLUMED_CORRELATION_TIMEOUT", "60s", time.Second, "how long an attach waits for its device")
	f.str(&c.nbdListen, "nbd-listen", "VOLUMED_NBD_LISTEN", nbd.DefaultListen, "NBD server address for volume exports; empty turns it off")
	f.boolean("nbd-auto-export", "VOLUMED_NBD_AUTO_EXPORT", "false", "export every volume attached to this host, read-only, as soon as its device is found")
	f.natsCreds(&c)
	f.natsServiceCreds(&c)
	f.StringVar(&c.apiToken, "api-token", "", "REST API bearer token, at least 16 characters ("+tokenEnv+", never shown here)")
	f.str(&c.apiTokenFile, "api-token-file", "VOLUMED_API_TOKEN_FILE", "", "file holding the REST API bearer token; default <data-dir>/"+tokenFileName+", generated at first start")
	f.str(&c.pprofListen, "pprof-listen", "VOLUMED_PPROF_LISTEN", "", "loopback address serving Go's profiles at /debug/pprof/; empty turns it off")
	f.tlsFlags(&c)
	if err := f.parse(args, &c); err != nil {
		return c, err
	}
	if err := checkPprofListen(c.pprofListen); err != nil {
		return c, err
	}
	if err := c.checkSecurity(); err != nil {
		return c, err
	}
	if err := c.tls.check(c.listen); err != nil {
		return c, err
	}
	if err := checkNATSURLs(c.natsURL); err != nil {
		return c, err
	}
	var err error
	if c.natsReplicas, err = strconv.Atoi(*replicas); err != nil || c.natsReplicas < 1 || c.natsReplicas > 5 {
		return c, fmt.Errorf("%w: --nats-replicas: want 1 to 5, got %q", errUsage, *replicas)
	}
	if c.deviceAgent, err = f.boolValue("device-agent"); err != nil {
		return c, err
	}
	if c.nbdAutoExport, err = f.boolValue("nbd-auto-export"); err != nil {
		return c, err
	}
	if c.syncInterval == 0 {
		c.syncInterval = -1
	}
	if c.natsConfig == "" {
		if _, err := os.Stat("nats.conf"); err == nil {
			c.natsConfig = "nats.conf"
		}
	}
	var missing []string
	for name, v := range map[string]string{"cloudstack-url": c.csURL, "cloudstack-api-key": c.csAPIKey,
		"cloudstack-secret-key": c.csSecretKey} {
		if v == "" {
			missing = append(missing, "--"+name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return c, fmt.Errorf("%w: %s required", errUsage, strings.Join(missing, ", "))
	}
	return c, nil
}

// checkNATSURLs refuses a --nats-url list with an empty or unreadable
// entry ("" itself means the embedded server).
func checkNATSURLs(list string) error {
	if list == "" {
		return nil
	}
	for _, u := range strings.Split(list, ",") {
		u = strings.TrimSpace(u)
		if u == "" {
			return fmt.Errorf("%w: --nats-url: empty URL in %q", errUsage, list)
		}
		if _, err := url.Parse(u); err != nil {
			return fmt.Errorf("%w: --nats-url: %w", errUsage, err)
		}
	}
	return nil
}

// parseAgentConfig parses `volumed agent`: the device agent alone, for a
// VM other than the one volumed runs on.
func parseAgentConfig(args []string, stderr io.Writer) (config, error) {
	c := config{agentOnly: true, deviceAgent: true}
	f := newFlagSet("volumed agent", "The device agent alone: it publishes this VM's block devices on\n"+
		"devices.<vm_id>.* and keeps their persistent names, for a volumed elsewhere.", stderr, &c)
	f.str(&c.natsURL, "nats-url", "VOLUMED_NATS_URL", "", "NATS URL of the volumed bus (required; tls://host:4222 off loopback)")
	f.natsCreds(&c)
	f.str(&c.tls.natsCA, "nats-ca", "VOLUMED_NATS_CA", "", "CA certificate (PEM) of the bus's servers: volumed's <data-dir>/tls/ca.pem; default the system's roots")
	if err := f.parse(args, &c); err != nil {
		return c, err
	}
	switch {
	case c.vmID == "":
		return c, fmt.Errorf("%w: --vm-id is required", errUsage)
	case c.natsURL == "":
		return c, fmt.Errorf("%w: --nats-url is required", errUsage)
	}
	return c, nil
}
