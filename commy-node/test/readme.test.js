'use strict'
// The Node quickstart of the repository's README.md, run as written: each
// `console.log(...) // expected` line must print what its comment says, and
// the process must exit by itself.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')

const { PKG, REPO, runtimeDir, run } = require('../support/helpers')

function quickstart() {
  const readme = fs.readFileSync(path.join(REPO, 'README.md'), 'utf8')
  const section = readme.split('## Quickstart (Node)')[1]
  assert.ok(section, 'README.md has no "## Quickstart (Node)" section')
  const block = /```js\n([\s\S]*?)```/.exec(section)
  assert.ok(block, 'the Node quickstart has no js code block')
  return block[1]
}

test('the README Node quickstart runs and prints what it says', async () => {
  const code = quickstart()
  const expected = [...code.matchAll(/console\.log\(.*\)\s*\/\/ (.+)$/gm)].map((m) => m[1].trim())
  assert.ok(expected.length >= 3, 'the quickstart shows its output in comments')
  // Run from the package folder so that `require('@commy/node')` resolves
  // to this package, as it does for an application that installed it.
  const r = await run(process.execPath, ['-e', code], { dir: runtimeDir(), cwd: PKG, timeoutMs: 60_000 })
  assert.equal(r.code, 0, r.stderr)
  assert.deepEqual(r.stdout.trim().split('\n'), expected)
})
