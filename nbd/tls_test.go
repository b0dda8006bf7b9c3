package nbd

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestTLS: with certificates created at first start, a TLS-only server is
// read with nbdinfo and nbdcopy over nbds:// with the client directory;
// plain clients get NBD_REP_ERR_TLS_REQD (nbdinfo fails, no data), a
// client without a client certificate fails the handshake, and a second
// TLSConfig call on the directory reuses the same certificates.
func TestTLS(t *testing.T) {
	requireTools(t, "nbdinfo", "nbdcopy", "qemu-img")
	dir := filepath.Join(t.TempDir(), "tls")
	tc, err := TLSConfig(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := os.ReadFile(filepath.Join(dir, ServerCertFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := TLSConfig(dir, nil); err != nil {
		t.Fatal(err)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, ServerCertFile)); string(again) != string(cert) {
		t.Fatal("second TLSConfig replaced the server certificate")
	}
	for _, p := range []string{ServerKeyFile, filepath.Join(ClientDir, ClientKeyFile)} {
		if fi, err := os.Stat(filepath.Join(dir, p)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want mode 0600", p, fi.Mode(), err)
		}
	}

	data := pattern(8*mib, 3)
	s := startServerWith(t, Config{TLS: tc, RequireTLS: true})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", data), ReadOnly: true})
	client := filepath.Join(dir, ClientDir)
	tlsURI := "nbds://" + s.Addr().String() + "/vol00000001?tls-certificates=" + client

	out := mustRun(t, "nbdinfo", "--json", tlsURI)
	var top nbdinfoTop
	if err := json.Unmarshal([]byte(out), &top); err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	if !top.TLS || !top.Structured || len(top.Exports) != 1 || top.Exports[0].Size != 8*mib {
		t.Fatalf("nbdinfo over TLS: %+v", top)
	}
	dst := filepath.Join(t.TempDir(), "copy.img")
	mustRun(t, "nbdcopy", tlsURI, dst)
	fileEquals(t, dst, data)
	qdst := filepath.Join(t.TempDir(), "copy.qcow2")
	mustRun(t, "qemu-img", "convert", "--object", "tls-creds-x509,id=tls0,dir="+client+",endpoint=client",
		"--image-opts", "driver=nbd,host=127.0.0.1,port="+strings.Split(s.Addr().String(), ":")[1]+",export=vol00000001,tls-creds=tls0",
		"-O", "qcow2", qdst)
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dst, qdst)

	if out, err := run(t, "nbdinfo", uri(s, "vol00000001")); err == nil {
		t.Fatalf("plain client served by a TLS-only server: %s", out)
	}
	// CA but no client certificate: the handshake fails.
	noCert := t.TempDir()
	caPEM, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	if err := os.WriteFile(filepath.Join(noCert, CACertFile), caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, "nbdinfo", "nbds://"+s.Addr().String()+"/vol00000001?tls-certificates="+noCert); err == nil {
		t.Fatalf("client without a certificate served: %s", out)
	}
	// On the wire: every option but STARTTLS and ABORT is refused.
	for _, opt := range []uint32{optList, optGo, optInfo, optStructuredRepl, 99} {
		nc, br := greet(t, s.Addr(), clientFixed)
		if _, err := nc.Write(option(magicOpt, opt, nil)); err != nil {
			t.Fatal(err)
		}
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			t.Fatal(err)
		}
		if got := binary.BigEndian.Uint32(h[12:]); got != repErrTLSReqd {
			t.Errorf("option %d before STARTTLS: reply %#x, want NBD_REP_ERR_TLS_REQD", opt, got)
		}
	}
}

// TestTLSOptional: a server with TLS configured but not required serves
// plain and TLS clients alike.
func TestTLSOptional(t *testing.T) {
	requireTools(t, "nbdinfo")
	dir := t.TempDir()
	tc, err := TLSConfig(dir, []string{"nbd.example"})
	if err != nil {
		t.Fatal(err)
	}
	s := startServerWith(t, Config{TLS: tc})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", make([]byte, mib))})
	for _, u := range []string{uri(s, "vol00000001"), "nbds://" + s.Addr().String() + "/vol00000001?tls-certificates=" + filepath.Join(dir, ClientDir)} {
		if got := nbdinfo(t, u); len(got) != 1 || got[0].Size != mib {
			t.Errorf("%s: %+v", u, got)
		}
	}
}

// TestStartTLSWire: STARTTLS with data is refused; after STARTTLS the
// negotiation goes on inside TLS with a client certificate, where a
// second STARTTLS is refused and the export is reached; a client without
// a certificate is cut off in the handshake.
func TestStartTLSWire(t *testing.T) {
	dir := t.TempDir()
	tc, err := TLSConfig(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := startServerWith(t, Config{TLS: tc, RequireTLS: true})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", pattern(mib, 8))})
	clientCert, err := tls.LoadX509KeyPair(filepath.Join(dir, ClientDir, ClientCertFile), filepath.Join(dir, ClientDir, ClientKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	caPEM, _ := os.ReadFile(filepath.Join(dir, ClientDir, CACertFile))
	roots.AppendCertsFromPEM(caPEM)

	nc, br := greet(t, s.Addr(), clientFixed)
	if _, err := nc.Write(option(magicOpt, optStartTLS, []byte{1})); err != nil {
		t.Fatal(err)
	}
	if types, _ := optReplies(t, br); types[0] != repErrInvalid {
		t.Fatalf("STARTTLS with data: %#x", types)
	}
	starttls := func(certs []tls.Certificate) (*tls.Conn, error) {
		if _, err := nc.Write(option(magicOpt, optStartTLS, nil)); err != nil {
			t.Fatal(err)
		}
		if types, _ := optReplies(t, br); types[0] != repAck {
			t.Fatalf("STARTTLS: %#x", types)
		}
		tcn := tls.Client(nc, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", Certificates: certs})
		if err := tcn.Handshake(); err != nil {
			return nil, err
		}
		// TLS 1.3 reports a refused client certificate on the first read.
		_, err := tcn.Write(option(magicOpt, optStartTLS, nil))
		return tcn, err
	}
	tcn, err := starttls([]tls.Certificate{clientCert})
	if err != nil {
		t.Fatal(err)
	}
	tbr := bufio.NewReader(tcn)
	if types, _ := optReplies(t, tbr); types[0] != repErrInvalid {
		t.Fatalf("second STARTTLS: %#x", types)
	}
	data := binary.BigEndian.AppendUint32(nil, 11)
	data = binary.BigEndian.AppendUint16(append(data, "vol00000001"...), 0)
	if _, err := tcn.Write(option(magicOpt, optGo, data)); err != nil {
		t.Fatal(err)
	}
	if types, _ := optReplies(t, tbr); types[len(types)-1] != repAck {
		t.Fatalf("GO inside TLS: %#x", types)
	}
	c := &wireClient{nc: tcn, br: tbr}
	if errno, got, err := c.cmd(cmdRead, 0, 4096, 4096, nil); err != nil || errno != 0 || !bytes.Equal(got, pattern(mib, 8)[4096:8192]) {
		t.Fatalf("read inside TLS: errno %d err %v", errno, err)
	}

	nc, br = greet(t, s.Addr(), clientFixed)
	if tcn, err := starttls(nil); err == nil {
		if _, err := io.ReadFull(bufio.NewReader(tcn), make([]byte, 20)); err == nil {
			t.Fatal("client without a certificate got a reply inside TLS")
		}
	}
}
