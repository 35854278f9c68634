'use strict'
// `npm pack`, then `npm install ./<tarball>` in a fresh folder, and use the
// installed package from CommonJS (`require`) and ESM (`import`): each makes
// a real call through the mesh. Run by `cargo xtask test --step node`.

const { execFileSync } = require('node:child_process')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const { PKG } = require('./helpers')

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'commy-node-pack-'))
try {
  const npm = (args, cwd) => execFileSync('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, encoding: 'utf8' })
  const packed = JSON.parse(npm(['pack', '--json', '--pack-destination', tmp], PKG))[0]
  const files = packed.files.map((f) => f.path).sort()
  for (const f of ['index.js', 'index.mjs', 'index.d.ts', 'binding.js', 'package.json', 'README.md']) {
    assert.ok(files.includes(f), `the tarball lacks ${f}: ${files.join(', ')}`)
  }
  assert.ok(files.some((f) => f.endsWith('.node')), `the tarball has no native addon: ${files.join(', ')}`)
  assert.ok(!files.some((f) => /^(src|test|support|bench)\//.test(f)), `the tarball carries sources or tests: ${files.join(', ')}`)
  console.log(`pack-check: ${packed.filename}, ${files.length} files, ${(packed.size / 1024).toFixed(0)} KiB`)

  const app = path.join(tmp, 'app')
  fs.mkdirSync(app)
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }))
  npm(['install', path.join(tmp, packed.filename)], app)

  const use = (mod) => `
    const mesh = await Mesh.open()
    await mesh.serve('echo', (req) => req)
    const reply = await mesh.call('echo', Buffer.from('${mod}'))
    const err = await mesh.call('nobody', 'x').catch((e) => e)
    if (!(err instanceof CommyError) || err.code !== 'NOT_FOUND') throw new Error('expected NOT_FOUND, got ' + err)
    await mesh.close()
    console.log(reply.toString())
  `
  fs.writeFileSync(
    path.join(app, 'cjs.js'),
    `const { Mesh, CommyError } = require('@commy/node')\n;(async () => {${use('require')}})().catch((e) => { console.error(e); process.exit(1) })\n`,
  )
  fs.writeFileSync(
    path.join(app, 'esm.mjs'),
    `import { Mesh, CommyError } from '@commy/node'\nimport commy from '@commy/node'\nif (commy.Mesh !== Mesh) throw new Error('the default export differs')\n${use('import')}\n`,
  )
  for (const [file, expected] of [
    ['cjs.js', 'require'],
    ['esm.mjs', 'import'],
  ]) {
    // The mesh's runtime dir: private to this check, as an application's env would set it.
    const runtimeDir = fs.mkdtempSync(path.join(tmp, 'run-'))
    fs.chmodSync(runtimeDir, 0o700)
    const env = { ...process.env, COMMY_RUNTIME_DIR: runtimeDir }
    const out = execFileSync(process.execPath, [file], { cwd: app, env, encoding: 'utf8', timeout: 60_000 }).trim()
    assert.equal(out, expected, `${file} printed ${out}`)
    console.log(`pack-check: the installed package works from ${file}`)
  }
} finally {
  fs.rmSync(tmp, { recursive: true, force: true })
}
