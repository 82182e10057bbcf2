// Command demo is the small HTTP service that config.toml.example supervises.
//
// It reads a key=value config file (reloaded on SIGHUP), says hello with the
// configured greeting, exposes Go runtime metrics for gosup's leak detection
// (/metrics, /debug/vars, /debug/pprof/), logs every request and a heartbeat,
// and shuts down gracefully on SIGTERM or SIGINT (http.Server.Shutdown: the
// requests in flight are finished).
//
// Zero-downtime restarts (docs/zero-downtime.md): under gosup with
// `sockets = ["tcp://..."]` it serves on the listening socket it inherits as
// fd 3 (systemd's LISTEN_FDS/LISTEN_PID protocol, read with the standard
// library); run without gosup, it binds -listen itself. It starts serving
// only once it is initialised, then says so with sd_notify's READY=1 (gosup's
// `[ready] notify = true`: only this process can say it, where a probe on the
// shared port may be answered by the old process), and /readyz says 200 from
// then on until SIGTERM arrives (503 while it drains). On SIGTERM it stops
// accepting first and lets every connection it accepted hand its request to
// a handler before it calls Shutdown (see drain below).
package main

import (
	"bufio"
	"context"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	_ "net/http/pprof" // /debug/pprof/ on http.DefaultServeMux
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	requests atomic.Int64
	serving  atomic.Bool // initialised and not draining: /readyz says 200
)

// accepted tracks the connections whose first request has not reached a
// handler yet. http.Server.Shutdown drops (closes without an answer) a request
// it reads after it began, so a connection accepted an instant before SIGTERM
// would be cut off; drain waits for these before Shutdown.
type accepted struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

type connKey struct{}

func (a *accepted) connState(c net.Conn, st http.ConnState) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch st {
	case http.StateNew:
		a.conns[c] = struct{}{}
	case http.StateIdle, http.StateClosed, http.StateHijacked:
		delete(a.conns, c)
	}
}

// handled wraps the handler: a request that got here is one Shutdown waits for.
func (a *accepted) handled(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
			a.mu.Lock()
			delete(a.conns, c)
			a.mu.Unlock()
		}
		next.ServeHTTP(w, r)
	})
}

func (a *accepted) waiting() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// drain stops accepting (gosup's copy of an inherited socket keeps listening:
// new connections wait for the replacement), waits for Serve to return and
// for the accepted connections' requests to reach a handler (at most 1s),
// then Shutdown finishes the requests in flight.
func drain(srv *http.Server, ln net.Listener, served <-chan error, conns *accepted, timeout time.Duration) error {
	_ = ln.Close()
	<-served
	for deadline := time.Now().Add(time.Second); conns.waiting() > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return srv.Shutdown(ctx)
}

// listener is the socket gosup passed as fd 3 (LISTEN_PID names this process),
// else one we bind ourselves. The LISTEN_* variables are removed either way,
// so a process we start does not take them for its own.
func listener(addr string) (net.Listener, error) {
	fds, pid := os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_PID")
	for _, k := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} {
		_ = os.Unsetenv(k)
	}
	if n, err := strconv.Atoi(fds); err == nil && n >= 1 && pid == strconv.Itoa(os.Getpid()) {
		f := os.NewFile(3, "listener")
		defer f.Close() // FileListener made its own copy
		ln, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("inherited fd 3: %w", err)
		}
		log.Printf("serving on the inherited socket %s (fd 3)", ln.Addr())
		return ln, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	log.Printf("serving on %s (bound ourselves: no inherited socket)", ln.Addr())
	return ln, nil
}

// sdNotify sends state (e.g. "READY=1") to the unix datagram socket named by
// NOTIFY_SOCKET, as systemd's sd_notify and go-systemd's daemon.SdNotify do;
// without NOTIFY_SOCKET it does nothing. The receiver knows our pid from the
// datagram itself (the kernel attaches it).
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") { // the abstract namespace
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}

func readyz(w http.ResponseWriter, _ *http.Request) {
	if !serving.Load() {
		http.Error(w, "not serving", http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ready")
}

// config is the parsed key=value file; guarded by mu because SIGHUP swaps it.
type config struct {
	mu     sync.RWMutex
	path   string
	values map[string]string
}

func (c *config) load() error {
	f, err := os.Open(c.path)
	if err != nil {
		return err
	}
	defer f.Close()
	values := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return fmt.Errorf("%s:%d: expected key=value", c.path, n)
		}
		values[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	c.values = values
	c.mu.Unlock()
	log.Printf("config loaded from %s (%d keys)", c.path, len(values))
	return nil
}

func (c *config) get(key, def string) string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if v, ok := c.values[key]; ok {
		return v
	}
	return def
}

func metrics(w http.ResponseWriter, _ *http.Request) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	fmt.Fprintf(w, "# HELP go_goroutines Number of goroutines that currently exist.\n"+
		"# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	fmt.Fprintf(w, "# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.\n"+
		"# TYPE go_memstats_heap_inuse_bytes gauge\ngo_memstats_heap_inuse_bytes %d\n", ms.HeapInuse)
	fmt.Fprintf(w, "# HELP demo_requests_total Requests served.\n"+
		"# TYPE demo_requests_total counter\ndemo_requests_total %d\n", requests.Load())
}

// access is the request log, on stdout: stderr keeps what explains an exit
// (gosup shows its last lines as the reason of a failed run).
var access = log.New(os.Stdout, "", log.LstdFlags|log.Lmicroseconds)

// logged counts and logs each request once it has been served.
func logged(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		requests.Add(1)
		next.ServeHTTP(w, r)
		access.Printf("%s %s %s %s", r.RemoteAddr, r.Method, r.URL.RequestURI(), time.Since(start).Round(time.Microsecond))
	})
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "HTTP listen address when no socket is inherited (LISTEN_FDS)")
	cfgPath := flag.String("config", "demo.conf", "key=value config file, reloaded on SIGHUP")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	cfg := &config{path: *cfgPath}
	if err := cfg.load(); err != nil {
		log.Fatalf("config: %v", err)
	}
	expvar.Publish("goroutines", expvar.Func(func() any { return runtime.NumGoroutine() }))
	expvar.Publish("requests", expvar.Func(func() any { return requests.Load() }))

	mux := http.DefaultServeMux // expvar and pprof registered themselves here
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, "%s, pid %d\n", cfg.get("greeting", "hello"), os.Getpid())
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", readyz)
	mux.HandleFunc("/metrics", metrics)
	conns := &accepted{conns: map[net.Conn]struct{}{}}
	srv := &http.Server{
		Handler:           conns.handled(logged(mux)),
		ReadHeaderTimeout: 10 * time.Second,
		ConnState:         conns.connState,
		ConnContext:       func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) },
	}

	ln, err := listener(*listen)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	// Everything is initialised: from here on any connection may be ours (on a
	// shared socket the kernel gives each one to whichever process accepts).
	errc := make(chan error, 1)
	serving.Store(true)
	go func() { errc <- srv.Serve(ln) }()
	log.Printf("demo serving http://%s (pid %d)", ln.Addr(), os.Getpid())
	if err := sdNotify("READY=1\nSTATUS=serving"); err != nil {
		log.Printf("sd_notify: %v", err) // gosup then takes us as not ready: a failed start
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	heartbeat := time.NewTicker(5 * time.Second)
	defer heartbeat.Stop()
	for {
		select {
		case err := <-errc:
			log.Fatalf("http: %v", err)
		case <-heartbeat.C:
			access.Printf("heartbeat: goroutines=%d requests=%d", runtime.NumGoroutine(), requests.Load())
		case s := <-sigs:
			if s == syscall.SIGHUP {
				if err := cfg.load(); err != nil {
					log.Printf("config reload failed, keeping the previous one: %v", err)
				}
				continue
			}
			log.Printf("%v received, shutting down", s)
			serving.Store(false) // /readyz: 503 while the requests in flight finish
			err := drain(srv, ln, errc, conns, 5*time.Second)
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Printf("shutdown: %v", err)
				os.Exit(1)
			}
			log.Print("stopped")
			return
		}
	}
}
