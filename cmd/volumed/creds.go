package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/pki"
)

// credsCommand is `volumed creds agent|server-config`.
type credsCommand struct {
	what string // "agent" or "server-config"
	vmID string
	out  string // "-" is standard output
	// tlsHosts and tlsLifetime: the external server's certificate
	// (server-config).
	tlsHosts    string
	tlsLifetime time.Duration
}

// parseCredsConfig parses `volumed creds`.
func parseCredsConfig(args []string, stderr io.Writer) (config, error) {
	c := config{creds: &credsCommand{}}
	fs := flag.NewFlagSet("volumed creds", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage:\n"+
			"  volumed creds agent --vm-id ID [--data-dir DIR] [--out FILE]\n"+
			"      mints the NATS credentials of the device agent of one VM (default <data-dir>/creds/agent-ID.creds)\n"+
			"  volumed creds server-config [--data-dir DIR] [--out FILE]\n"+
			"      prints the nats-server configuration that trusts volumed's credentials, for an external server,\n"+
			"      with its TLS: a certificate of volumed's CA for --tls-host, written to <data-dir>/tls/nats-server-*.pem\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&c.dataDir, "data-dir", env("VOLUMED_DATA_DIR", "./volumed-data"), "volumed's data directory (VOLUMED_DATA_DIR)")
	fs.StringVar(&c.creds.vmID, "vm-id", "", "the agent's CloudStack VM")
	fs.StringVar(&c.creds.out, "out", "", "where to write; - is standard output")
	fs.StringVar(&c.creds.tlsHosts, "tls-host", "", "server-config: the external servers' names or addresses, comma-separated (default this host's)")
	fs.DurationVar(&c.creds.tlsLifetime, "tls-lifetime", 365*24*time.Hour, "server-config: life of the external servers' certificate (run again before it ends, then nats-server --signal reload)")
	if len(args) == 0 || (args[0] != "agent" && args[0] != "server-config") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
			fs.Usage()
			return c, flag.ErrHelp
		}
		fs.Usage()
		return c, fmt.Errorf("%w: volumed creds needs agent or server-config", errUsage)
	}
	c.creds.what = args[0]
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, err
		}
		return c, fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	switch c.creds.what {
	case "agent":
		vm, err := commands.NormalizeVMID(c.creds.vmID)
		if err != nil {
			return c, fmt.Errorf("%w: --vm-id: %w", errUsage, err)
		}
		c.creds.vmID = vm
		if c.creds.out == "" {
			c.creds.out = bus.AgentCredsFile(credsDir(c.dataDir), vm)
		}
	case "server-config":
		if c.creds.out == "" {
			c.creds.out = "-"
		}
	}
	return c, nil
}

// externalServerTLS issues the external servers' certificate with
// volumed's CA (made if missing: the daemon then uses the same) and
// returns the configuration that uses it.
func externalServerTLS(c config) (string, error) {
	dir := tlsDir(c.dataDir)
	ca, err := pki.LoadCA(dir)
	if err != nil {
		return "", err
	}
	var hosts []string
	for _, h := range strings.Split(c.creds.tlsHosts, ",") {
		hosts = append(hosts, strings.TrimSpace(h))
	}
	cert, err := ca.Issue("volumed NATS server", pki.LocalHosts(hosts...), c.creds.tlsLifetime)
	if err != nil {
		return "", err
	}
	certPEM, keyPEM, err := pki.EncodePair(cert)
	if err != nil {
		return "", err
	}
	certFile, keyFile := filepath.Join(dir, "nats-server-cert.pem"), filepath.Join(dir, "nats-server-key.pem")
	if err := bus.WriteSecret(keyFile, keyPEM, false); err != nil {
		return "", err
	}
	if err := bus.WriteSecret(certFile, certPEM, false); err != nil {
		return "", err
	}
	abs := func(p string) string {
		if a, err := filepath.Abs(p); err == nil {
			return a
		}
		return p
	}
	return bus.ServerConfigTLS(abs(certFile), abs(keyFile), abs(filepath.Join(dir, pki.CAFile))), nil
}

// credsDir is the creds directory of a data dir.
func credsDir(dataDir string) string { return filepath.Join(dataDir, "creds") }

// runCreds mints what c.creds asks for with the keys in the data dir
// (made if missing: the daemon then uses the same).
func runCreds(c config, stdout, stderr io.Writer) error {
	a, err := bus.LoadAuthority(credsDir(c.dataDir))
	if err != nil {
		return err
	}
	var data []byte
	switch c.creds.what {
	case "agent":
		data, err = a.AgentCreds(c.creds.vmID)
	default:
		// The roles' credentials, --nats-creds and --nats-service-creds
		// of a daemon on that server.
		if err = a.WriteRoleCreds(); err != nil {
			return err
		}
		var s string
		if s, err = a.ServerConfig(); err == nil {
			var t string
			t, err = externalServerTLS(c)
			s += t
		}
		data = []byte(s)
	}
	if err != nil {
		return err
	}
	if c.creds.out == "-" {
		_, err = stdout.Write(data)
		return err
	}
	if err := bus.WriteSecret(c.creds.out, data, false); err != nil {
		return err
	}
	fmt.Fprintln(stderr, "volumed: wrote", c.creds.out)
	return nil
}
